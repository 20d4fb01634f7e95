"""Run statistics and the JSON sidecar (`PREFIX.json`) written next to the datasets.

The sidecar is written last and atomically: its presence marks a complete run. It records what is
needed to trust and reproduce the data: tokenizer hash and vocabulary size, token dtype, documents
read / kept / dropped per reason with file:line samples, tokens and documents per output dataset, the
input files with their sizes and hashes, and every option used.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from megatron_andromeda.preprocess.readers import MALFORMED_REASONS, InputFile, file_sha256

SIDECAR_VERSION = 1


@dataclass
class DropLog:
    """Dropped documents per reason, with the first `max_samples` "file:line" locations of each."""

    max_samples: int = 10
    counts: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str, line: int) -> None:
        self.counts[reason] += 1
        kept = self.samples.setdefault(reason, [])
        if len(kept) < self.max_samples:
            kept.append(f"{path}:{line}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict]:
        return {
            reason: {"count": count, "samples": self.samples.get(reason, [])}
            for reason, count in sorted(self.counts.items())
        }


class InputHasher:
    """sha256 of the input files, computed on a background thread while the run goes on
    (hashlib releases the GIL on large updates, so this costs the main loop nothing)."""

    def __init__(self, files: Sequence[InputFile]) -> None:
        self._files = list(files)
        self._hashes: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="input-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for spec in self._files:
                self._hashes[spec.path] = file_sha256(spec.path)
        except BaseException as e:  # reported by result()
            self._error = e

    def result(self) -> list[dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return [
            {"path": os.path.abspath(f.path), "format": f.kind, "compression": f.compression,
             "bytes": f.size, "sha256": self._hashes[f.path]}
            for f in self._files
        ]  # fmt: skip


def malformed_total(drops: DropLog) -> int:
    return sum(drops.counts[r] for r in MALFORMED_REASONS)


def write_atomic(path: str, blocks: Iterable[bytes]) -> None:
    """Write `blocks` under a temporary name, fsync, then rename onto `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        for block in blocks:
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, payload: dict) -> None:
    """Write `payload` as indented JSON, atomically."""
    write_atomic(path, [(json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8")])


def summary_lines(report: dict) -> list[str]:
    """A few human-readable lines for the end of a run."""
    docs = report["documents"]
    lines = [
        f"read {docs['read']:,} documents, kept {docs['kept']:,}, dropped {docs['dropped']:,} "
        f"in {report['seconds']:.1f} s ({report['tokens_per_second'] / 1e6:.2f} Mtok/s)"
    ]
    for reason, item in report["dropped"].items():
        sample = f" e.g. {item['samples'][0]}" if item["samples"] else ""
        lines.append(f"  dropped {item['count']:,} {reason}{sample}")
    for name, out in report["outputs"].items():
        lines.append(f"  {out['prefix']}: {out['documents']:,} documents, {out['tokens']:,} tokens ({name})")
    return lines
