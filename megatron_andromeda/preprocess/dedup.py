"""Exact and near-duplicate detection: normalised-text digests and MinHash LSH.

Work is split so the main process stays cheap: workers compute a 16-byte digest and the LSH band keys
of every document (`exact_digest`, `MinHasher.band_keys`); the main process walks documents in input
order and keeps the first of each group (`SeenDigests`, `LSHIndex`), so results do not depend on the
number of workers.

MinHash signatures use one-permutation hashing with optimal densification (Li et al. 2012, Shrivastava
2017): each shingle is hashed once into one of `num_perm` bins and a bin keeps its minimum, which
costs O(shingles) instead of O(shingles x num_perm) for classic MinHash (datasketch's `MinHash`), with
the same collision probability (the Jaccard similarity). `benchmarks/bench_preprocess.py` measures
both on the reference corpus.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from megatron_andromeda.preprocess.report import write_atomic
from megatron_andromeda.preprocess.words import Words, ngram_hashes, splitmix64

_U64 = np.uint64
_EMPTY_BIN = _U64(1 << 32)  # larger than any 32-bit bin value


DIGEST_DTYPE = np.dtype("V16")


def exact_digest(text: str) -> bytes:
    """16-byte digest of `text` with case folded and whitespace runs collapsed."""
    normalized = " ".join(text.lower().split())
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def digests_path(dataset_prefix: str) -> str:
    """Where a run keeps the exact-dedup digest of each document of a dataset it wrote (16 bytes
    each, in dataset order), so that tools/merge_datasets.py can deduplicate across runs."""
    return f"{dataset_prefix}.digests"


def write_digests(dataset_prefix: str, digests: list[bytes]) -> str:
    """Write the digest file atomically; returns its path."""
    path = digests_path(dataset_prefix)
    write_atomic(path, digests)
    return path


def read_digests(path: str) -> np.ndarray:
    """(documents,) array of 16-byte digests."""
    return np.fromfile(path, dtype=DIGEST_DTYPE)


class SeenDigests:
    """Exact-duplicate filter: remembers the digest of every kept document."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def add_if_new(self, digest: bytes) -> bool:
        """True (and remembered) the first time a digest is offered, False for a duplicate."""
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True

    def __len__(self) -> int:
        return len(self._seen)


def _false_positive_area(threshold: float, bands: int, rows: int, steps: int = 200) -> float:
    s = (np.arange(steps) + 0.5) / steps * threshold  # midpoints on [0, threshold]
    return float(np.mean(1.0 - (1.0 - s**rows) ** bands) * threshold)


def _false_negative_area(threshold: float, bands: int, rows: int, steps: int = 200) -> float:
    s = threshold + (np.arange(steps) + 0.5) / steps * (1.0 - threshold)
    return float(np.mean((1.0 - s**rows) ** bands) * (1.0 - threshold))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the false-positive + false-negative probability mass at `threshold`."""
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        error = _false_positive_area(threshold, bands, rows) + _false_negative_area(threshold, bands, rows)
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures over word `ngram`-shingles and their LSH band keys."""

    num_perm: int = 128
    ngram: int = 5
    threshold: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"--minhash-threshold {self.threshold}: must be strictly between 0 and 1")
        if self.num_perm < 2 or self.ngram < 1:
            raise ValueError(f"minhash num_perm={self.num_perm} must be >= 2 and ngram={self.ngram} >= 1")

    @cached_property
    def bands(self) -> tuple[int, int]:
        """(bands, rows) of the LSH index."""
        return lsh_bands(self.threshold, self.num_perm)

    def signature(self, words: Words) -> np.ndarray:
        """(num_perm,) uint64 signature with values below 2^32; all zero for a document without words."""
        if len(words) == 0:
            return np.zeros(self.num_perm, dtype=np.uint64)
        shingles = splitmix64(words.ngram_hashes(min(self.ngram, len(words))))  # (S,)
        bins = ((shingles >> _U64(32)) * _U64(self.num_perm)) >> _U64(32)  # uniform in [0, num_perm)
        signature = np.full(self.num_perm, _EMPTY_BIN, dtype=np.uint64)
        np.minimum.at(signature, bins.astype(np.intp), shingles & _U64(0xFFFFFFFF))
        return self._densify(signature)

    def _densify(self, signature: np.ndarray) -> np.ndarray:
        """Fill each empty bin i from the first non-empty bin on i's own fixed pseudo-random probe
        sequence, which keeps the collision probability equal to the Jaccard similarity."""
        filled = signature != _EMPTY_BIN
        empty = np.flatnonzero(~filled)
        out = signature.copy()
        attempt = 0
        while empty.size:
            attempt += 1
            probe = splitmix64((empty.astype(np.uint64) << _U64(32)) | _U64(attempt)) % _U64(self.num_perm)
            probe = probe.astype(np.intp)
            hit = filled[probe]
            out[empty[hit]] = signature[probe[hit]]
            empty = empty[~hit]
        return out

    def band_keys(self, words: Words) -> np.ndarray:
        """(bands,) uint64: one hash per LSH band of the signature (the band index is mixed in)."""
        return band_hashes(self.signature(words)[None], *self.bands)[0]

    def signatures(self, documents: Sequence[Words]) -> np.ndarray:
        """(D, num_perm) uint64: `signature` of every document, computed for all of them at once.

        Equal to `[self.signature(w) for w in documents]`, value for value, but each numpy pass
        covers the shingles of every document: the per-call overhead that dominates `signature` on
        documents of a few hundred words is paid once per batch (the near-dup stage's signatures,
        `benchmarks/bench_neardup.py` measures the ratio)."""
        out = np.zeros((len(documents), self.num_perm), dtype=np.uint64)
        full = [i for i, w in enumerate(documents) if len(w) >= self.ngram]
        for i, w in enumerate(documents):  # shorter than one shingle: their own n, one by one (rare)
            if 0 < len(w) < self.ngram:
                out[i] = self.signature(w)
        if full:
            out[full] = self._batch_signatures([documents[i].hashes for i in full])
        return out

    def _batch_signatures(self, word_hashes: list[np.ndarray]) -> np.ndarray:
        """Signatures of documents of >= ngram words, from their word hashes."""
        n = self.ngram
        sizes = np.fromiter(map(len, word_hashes), dtype=np.int64, count=len(word_hashes))
        grams = ngram_hashes(np.concatenate(word_hashes), n)  # every document's words back to back
        # An n-gram starting in the last n - 1 words of a document runs into the next one: drop it.
        inside = np.ones(grams.size + n - 1, dtype=bool)
        ends = np.cumsum(sizes)[:-1]  # (D - 1,) first word of each next document
        inside[(ends[:, None] - np.arange(1, n)).ravel()] = False
        shingles = splitmix64(grams[inside[: grams.size]])  # (S,)
        for_doc = np.repeat(np.arange(sizes.size), sizes - n + 1)  # (S,) document of each shingle
        bins = ((shingles >> _U64(32)) * _U64(self.num_perm)) >> _U64(32)
        flat = np.full(sizes.size * self.num_perm, _EMPTY_BIN, dtype=np.uint64)
        np.minimum.at(flat, for_doc * self.num_perm + bins.astype(np.int64), shingles & _U64(0xFFFFFFFF))
        return self._densify_batch(flat.reshape(sizes.size, self.num_perm))

    def _densify_batch(self, signatures: np.ndarray) -> np.ndarray:
        """`_densify` of every row: an empty bin's probe sequence depends on the bin alone."""
        filled = signatures != _EMPTY_BIN
        docs, empty = np.nonzero(~filled)
        out = signatures.copy()
        attempt = 0
        while empty.size:
            attempt += 1
            probe = splitmix64((empty.astype(np.uint64) << _U64(32)) | _U64(attempt)) % _U64(self.num_perm)
            probe = probe.astype(np.intp)
            hit = filled[docs, probe]
            out[docs[hit], empty[hit]] = signatures[docs[hit], probe[hit]]
            docs, empty = docs[~hit], empty[~hit]
        return out


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(D, bands) uint64 LSH keys of (D, >= bands x rows) signatures: one hash of each band's rows,
    with the band index mixed in so that equal rows in different bands never share a key."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} hashes, signatures have "
                         f"{signatures.shape[1]}")  # fmt: skip
    grouped = signatures[:, : bands * rows].reshape(signatures.shape[0], bands, rows)
    weights = splitmix64(np.arange(1, rows + 1, dtype=np.uint64))  # (rows,)
    band_ids = np.arange(bands, dtype=np.uint64) << _U64(40)
    return splitmix64((grouped * weights).sum(axis=2, dtype=np.uint64) ^ band_ids)


class LSHIndex:
    """Near-duplicate filter: a document is a duplicate when any of its band keys was seen before."""

    def __init__(self, bands: int) -> None:
        self._tables: list[set[int]] = [set() for _ in range(bands)]

    def add_if_new(self, keys: np.ndarray) -> bool:
        """True (and indexed) when no band of `keys` matches a kept document, else False."""
        values = keys.tolist()
        if any(v in table for v, table in zip(values, self._tables)):
            return False
        for v, table in zip(values, self._tables):
            table.add(v)
        return True
