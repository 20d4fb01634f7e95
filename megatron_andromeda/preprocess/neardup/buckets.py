"""Stage 2, one task per band (or `bands_per_task` bands): candidate pairs from equal band keys.

Documents are numbered globally in input order (input 0's documents, then input 1's, ...), so the
numbering, and everything derived from it, is the same whether the corpus came as one file or as
N. In a band, the documents that share a key form a bucket; each member is paired with the
bucket's first (lowest-numbered) member, which links the bucket with one pair per member instead
of one per pair of members. Pairs found by several bands of the task are written once.

Memory: one band of keys for the whole corpus and its sort order (8 + 8 bytes per document, 8
more while sorting), plus the pairs.
"""

from __future__ import annotations

import time

import numpy as np

from megatron_andromeda.preprocess.neardup.workdir import (
    Plan,
    load_output,
    require_stage,
    save_npy,
    stage_digest,
    write_marker,
)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(P, 2) int64 pairs (first member of a bucket, another member) of (N,) band keys; the
    first member is the lowest index with that key."""
    order = np.argsort(keys, kind="stable")  # equal keys keep index order: the bucket's first is lowest
    ordered = keys[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1  # sorted positions repeating the key before
    del ordered  # from here on, memory is the sort order plus O(pairs)
    # Repeats of one bucket are consecutive positions; a gap starts the next bucket, whose first
    # member sits just before its first repeat.
    new_bucket = np.ones(repeats.size, dtype=bool)
    new_bucket[1:] = repeats[1:] != repeats[:-1] + 1
    first = (repeats[new_bucket] - 1)[np.cumsum(new_bucket) - 1]
    return np.stack([order[first], order[repeats]], axis=1).astype(np.int64)


def unique_pairs(pairs: np.ndarray, documents: int) -> np.ndarray:
    """Distinct rows of (P, 2) pairs, sorted."""
    if pairs.shape[0] == 0 or documents >= 1 << 31:
        return pairs
    codes = np.unique(pairs[:, 0] * documents + pairs[:, 1])  # fits int64 below 2^31 documents
    return np.stack([codes // documents, codes % documents], axis=1)


def document_counts(signature_markers: list[dict]) -> np.ndarray:
    """(inputs,) documents per input, from the signature markers."""
    return np.array([m["documents"]["kept"] for m in signature_markers], dtype=np.int64)


def band_keys(plan: Plan, signature_markers: list[dict], band: int) -> np.ndarray:
    """(N,) uint64: one band's keys of every document, in global order."""
    counts = document_counts(signature_markers)
    out = np.empty(int(counts.sum()), dtype=np.uint64)
    first = 0
    for marker, count in zip(signature_markers, counts):
        shape = (plan.settings.bands, int(count))
        keys = load_output(plan, "signatures", marker["outputs"]["keys"], shape, np.dtype(np.uint64))
        out[first : first + count] = keys[band]  # one contiguous slice of the band-major file
        first += count
    return out


def bucket_task(plan: Plan, task: int) -> dict:
    """Candidate pairs of the task's bands; writes them and the marker, returns the marker."""
    start = time.perf_counter()
    signatures = require_stage(plan, "signatures")
    documents = int(document_counts(signatures).sum())
    found = [candidate_pairs(band_keys(plan, signatures, band)) for band in plan.bands_of(task)]
    pairs = unique_pairs(np.concatenate(found), documents)
    record = save_npy(plan.path("buckets", f"{task:05d}.pairs.npy"), pairs)
    return write_marker(plan, "buckets", task, {
        "bands": list(plan.bands_of(task)),
        "documents": documents,
        "pairs": int(pairs.shape[0]),
        "pairs_per_band": [int(p.shape[0]) for p in found],
        "outputs": {"pairs": record},
        "upstream": stage_digest(signatures),
        "seconds": round(time.perf_counter() - start, 3),
    })  # fmt: skip
