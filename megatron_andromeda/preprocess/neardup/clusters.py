"""Stage 3, one task: candidate pairs -> clusters (union-find) -> a drop list per input, and the report.

A cluster is a connected component of the candidate pairs. The member kept is the lowest-numbered,
i.e. the earliest in global input order, so the decision does not depend on how the corpus is
split into inputs; every other member is dropped.

Memory is bounded by the pairs, not the corpus: only documents that appear in some pair get a slot
(their sorted global numbers and a parent array, 16 bytes each), and the pair files are read
memory-mapped, `PAIRS_PER_BLOCK` at a time. Union-find runs vectorised, a block of pairs at a time:
find both roots (pointer jumping), hook the larger root under the smaller (`np.minimum.at`, so of
several hooks of one root the smallest wins), repeat for the pairs still apart. Parents only ever
point to smaller slots, so roots are the smallest member of their set: the one to keep.
"""

from __future__ import annotations

import time

import numpy as np

from megatron_andromeda.preprocess.neardup.buckets import document_counts
from megatron_andromeda.preprocess.neardup.workdir import (
    NearDupError,
    Plan,
    load_output,
    require_stage,
    save_npy,
    stage_digest,
    write_marker,
)

PAIRS_PER_BLOCK = 1 << 22  # 64 MiB of pairs in memory at a time


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    root = parent[x]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            return root
        root = up


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of a[i] and b[i] for every i, in place; a root stays its set's smallest slot."""
    while a.size:
        ra, rb = _roots(parent, a), _roots(parent, b)
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        if a.size:
            np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def flatten(parent: np.ndarray) -> np.ndarray:
    """Point every slot straight at its root, in place; returns `parent`."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent[:] = up


def _blocks(pairs: np.ndarray):
    for first in range(0, pairs.shape[0], PAIRS_PER_BLOCK):
        yield np.asarray(pairs[first : first + PAIRS_PER_BLOCK])


def cluster_pairs(pair_arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(members, roots): the sorted global numbers of every document in some pair, and the global
    number of its cluster's first (kept) member."""
    members = np.zeros(0, dtype=np.int64)
    for pairs in pair_arrays:  # first pass: which documents take part
        for block in _blocks(pairs):
            members = np.union1d(members, np.unique(block))
    parent = np.arange(members.size, dtype=np.int64)
    for pairs in pair_arrays:
        for block in _blocks(pairs):
            slots = np.searchsorted(members, block)
            union(parent, slots[:, 0], slots[:, 1])
            flatten(parent)
    return members, members[flatten(parent)]


def _bucket_outputs(plan: Plan, signatures: list[dict]) -> tuple[list[dict], list[np.ndarray]]:
    """The bucket markers and their pair arrays (memory-mapped), refusing stale ones."""
    buckets = require_stage(plan, "buckets")
    upstream = stage_digest(signatures)
    for task, marker in enumerate(buckets):
        if marker.get("upstream") != upstream:
            raise NearDupError(
                f"{plan.marker_path('buckets', task)}: made from signatures that have been redone since; "
                f"rerun `tools/neardup.py buckets --work-dir {plan.work_dir}` first"
            )
    shape = lambda m: (m["pairs"], 2)  # noqa: E731
    return buckets, [
        load_output(plan, "buckets", m["outputs"]["pairs"], shape(m), np.dtype(np.int64)) for m in buckets
    ]


def cluster_task(plan: Plan, task: int = 0) -> dict:
    """Clusters and drop lists of the whole run; writes them and the report, returns the report."""
    start = time.perf_counter()
    signatures = require_stage(plan, "signatures")
    buckets, pairs = _bucket_outputs(plan, signatures)
    members, roots = cluster_pairs(pairs)
    counts = document_counts(signatures)
    offsets = np.concatenate(([0], np.cumsum(counts)))  # (inputs + 1,) first global number of each
    lines = [
        load_output(plan, "signatures", m["outputs"]["lines"], (m["documents"]["kept"],), np.dtype(np.int64))
        for m in signatures
    ]
    dropped = members[roots != members]  # ascending global numbers
    outputs, per_input = {}, []
    for index, (first, last) in enumerate(zip(offsets[:-1], offsets[1:])):
        rows = dropped[np.searchsorted(dropped, first) : np.searchsorted(dropped, last)] - first
        outputs[f"{index:05d}"] = save_npy(plan.path("clusters", f"{index:05d}.drop.npy"), lines[index][rows])
        per_input.append(
            {"path": plan.inputs[index], "documents": int(counts[index]), "dropped": int(rows.size)}
        )
    seconds = time.perf_counter() - start
    return write_marker(plan, "clusters", task, {
        **_report(plan, signatures, pairs, members, roots, offsets, lines),
        "inputs": per_input,
        "outputs": outputs,
        "upstream": stage_digest(buckets),
        "seconds": round(seconds, 3),
        "seconds_per_stage": {"signatures": round(sum(m["seconds"] for m in signatures), 3),
                              "buckets": round(sum(m["seconds"] for m in buckets), 3),
                              "clusters": round(seconds, 3)},
    })  # fmt: skip


def _report(
    plan: Plan,
    signatures: list[dict],
    pairs: list[np.ndarray],
    members: np.ndarray,
    roots: np.ndarray,
    offsets: np.ndarray,
    lines: list[np.ndarray],
) -> dict:
    """Documents in, clusters, dropped, cluster sizes and sample clusters with file:line members."""
    read = sum(m["documents"]["read"] for m in signatures)
    kept = int(offsets[-1])
    cluster_roots, sizes = np.unique(roots, return_counts=True)
    dropped = int(members.size - cluster_roots.size)

    def where(number: int) -> str:
        index = int(np.searchsorted(offsets, number, side="right") - 1)
        return f"{plan.inputs[index]}:{int(lines[index][number - offsets[index]])}"

    samples = []
    for root in cluster_roots[: plan.settings.max_samples]:
        others = members[(roots == root) & (members != root)]
        samples.append({"size": int(others.size + 1), "kept": where(int(root)),
                        "dropped": [where(int(x)) for x in others[:5]]})  # fmt: skip
    cleaning_drops: dict[str, int] = {}
    for marker in signatures:
        for reason, item in marker["dropped"].items():
            cleaning_drops[reason] = cleaning_drops.get(reason, 0) + item["count"]
    return {
        "documents": {"read": read, "not_documents": read - kept, "in": kept,
                      "in_clusters": int(members.size), "dropped": dropped, "kept": kept - dropped},
        "not_documents": dict(sorted(cleaning_drops.items())),
        "candidate_pairs": int(sum(p.shape[0] for p in pairs)),
        "clusters": int(cluster_roots.size),
        "largest_cluster": int(sizes.max()) if sizes.size else 0,
        "cluster_sizes": {str(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))},
        "sample_clusters": samples,
    }  # fmt: skip
