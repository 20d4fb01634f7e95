"""Deterministic train/valid/test assignment of documents by content hash.

A document's split depends only on its text, never on its position, the input files or the number of
workers, so rerunning, reordering inputs or adding files keeps every existing document where it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
_PERSON = b"andromeda-split"  # blake2b personalisation: independent of the dedup digests


def parse_split(spec: str) -> tuple[float, float, float]:
    """'98,1,1' (or '98/1/1', '1' or '90,10') -> normalised (train, valid, test) weights."""
    parts = [p for p in spec.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError as e:
        raise ValueError(f"--split {spec!r}: expected up to three numbers such as 98,1,1") from e
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {spec!r}: expected one to three non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return (weights[0] / total, weights[1] / total, weights[2] / total)


class Splitter:
    """Maps a document's UTF-8 bytes to a split index (0 train, 1 valid, 2 test)."""

    def __init__(self, weights: Sequence[float]) -> None:
        if len(weights) != len(SPLIT_NAMES):
            raise ValueError(f"split weights {weights}: need one per split {SPLIT_NAMES}")
        cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))
        # Integer bounds on [0, 2^64): a document goes to the first split whose bound exceeds its hash.
        self._bounds = [min(int(round(c * 2.0**64)), 2**64) for c in cumulative[:-1]]
        self.weights = tuple(float(w) for w in weights)

    @property
    def active(self) -> list[int]:
        """Indices of the splits that can receive documents."""
        return [i for i, w in enumerate(self.weights) if w > 0]

    def split_of(self, data: bytes) -> int:
        value = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=_PERSON).digest(), "big")
        for index, bound in enumerate(self._bounds):
            if value < bound:
                return index
        return len(self._bounds)
