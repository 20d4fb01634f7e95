"""Precision, recall and F1 of near-dedup against a labelled benchmark (`tools/neardup_quality.py`).

What is scored is the decision that matters: which documents are dropped. Truth: in every family
(a source and its duplicates) all but the first in file order are to be dropped; related and
unrelated documents are to be kept. A dropped document is a true positive when the truth drops it
too, whichever member of its family was kept.

Two ways to get the drop decisions: `pipeline_drops` runs the real stages over the benchmark file
in a work directory (what the default-setting figure uses), `drops_for` recomputes them in memory
from signatures computed once, with the same functions the stages call (`band_hashes`,
`candidate_pairs`, `cluster_pairs`), which is what makes sweeping hundreds of settings cheap.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.preprocess.dedup import band_hashes
from megatron_andromeda.preprocess.neardup.buckets import candidate_pairs
from megatron_andromeda.preprocess.neardup.clusters import cluster_pairs
from megatron_andromeda.preprocess.neardup.runner import run_all
from megatron_andromeda.preprocess.neardup.settings import NearDupSettings
from megatron_andromeda.preprocess.neardup.signatures import document_words
from megatron_andromeda.preprocess.neardup.workdir import init_plan, load_output, read_marker


@dataclass(frozen=True)
class Scores:
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else 1.0

    @property
    def recall(self) -> float:
        wanted = self.true_positives + self.false_negatives
        return self.true_positives / wanted if wanted else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def read_benchmark(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truth_drops(records: Sequence[dict]) -> set[int]:
    """Indices of the records to drop: every family member after the family's first."""
    seen, out = set(), set()
    for i, record in enumerate(records):
        if record["family"] in seen:
            out.add(i)
        seen.add(record["family"])
    return out


def score(records: Sequence[dict], dropped: set[int]) -> Scores:
    truth = truth_drops(records)
    return Scores(len(truth & dropped), len(dropped - truth), len(truth - dropped))


def breakdown(records: Sequence[dict], dropped: set[int]) -> dict[str, dict]:
    """Per edit: how many records, how many dropped, and how many should be."""
    truth = truth_drops(records)
    rows: dict[str, Counter] = defaultdict(Counter)
    for i, record in enumerate(records):
        row = rows[f"{record['kind']}/{record['edit']}" if record["edit"] else record["kind"]]
        row["records"] += 1
        row["dropped"] += i in dropped
        row["should_drop"] += i in truth
        row["wrongly_dropped"] += i in dropped and i not in truth
        row["missed"] += i in truth and i not in dropped
    return {name: dict(row) for name, row in sorted(rows.items())}


def signatures_of(records: Sequence[dict], settings: NearDupSettings) -> tuple[np.ndarray, np.ndarray]:
    """(record index (D,), signatures (D, num_perm)) of the records that are documents."""
    index, words = [], []
    for i, record in enumerate(records):
        result = document_words(tuple(record[k] for k in settings.json_keys), settings.cleaning)
        if not isinstance(result, str):
            index.append(i)
            words.append(result)
    return np.asarray(index, dtype=np.int64), settings.minhasher.signatures(words)


def drops_for(index: np.ndarray, signatures: np.ndarray, bands: int, rows: int) -> set[int]:
    """Record indices dropped with `bands` x `rows`, as the stages would decide."""
    keys = band_hashes(signatures, bands, rows)  # (D, bands)
    pairs = [candidate_pairs(np.ascontiguousarray(keys[:, b])) for b in range(bands)]
    members, roots = cluster_pairs(pairs)
    return set(index[members[roots != members]].tolist())


def sweep(records: Sequence[dict], settings: NearDupSettings, grid: Sequence[tuple[int, int]]) -> list[dict]:
    """Scores of every (bands, rows) in `grid`, signatures computed once."""
    index, signatures = signatures_of(records, settings)
    out = []
    for bands, rows in grid:
        s = score(records, drops_for(index, signatures, bands, rows))
        out.append({"bands": bands, "rows": rows, "threshold": round((1 / bands) ** (1 / rows), 3),
                    "precision": s.precision, "recall": s.recall, "f1": s.f1,
                    "false_positives": s.false_positives, "false_negatives": s.false_negatives})  # fmt: skip
    return out


def default_grid(num_perm: int) -> list[tuple[int, int]]:
    """Every bands x rows <= num_perm whose S-curve midpoint lies in [0.4, 0.95]."""
    return [
        (b, r)
        for r in range(1, num_perm + 1)
        for b in range(1, num_perm // r + 1)
        if 0.4 <= (1 / b) ** (1 / r) <= 0.95
    ]


def pipeline_drops(
    benchmark_path: str, work_dir: str, settings: NearDupSettings, workers: int = 0
) -> set[int]:
    """Run every stage over the benchmark file; the record indices its drop list holds."""
    plan = init_plan(work_dir, [benchmark_path], settings)
    run_all(plan, workers=workers, log=False)
    report = read_marker(plan, "clusters", 0)
    lines = load_output(
        plan, "clusters", report["outputs"]["00000"], (report["inputs"][0]["dropped"],), np.int64
    )
    return {int(line) - 1 for line in lines}  # lines are 1-based
