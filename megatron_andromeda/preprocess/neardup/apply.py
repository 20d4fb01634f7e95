"""Stage 4: a preprocessing run (`tools/preprocess_data.py --near-dup-dir W`) drops what a finished
near-dup run says to drop.

The run may cover all of the near-dup run's inputs or any of them (one machine's share); each of
its input files must be one of them, unchanged, and the run must decide which records are documents
exactly as the signature stage did (same `--json-keys`, same cleaning), or the lines would not mean
the same documents. Sizes are checked before any work, content hashes (which the run computes
anyway) before the sidecar is written: a mismatch is an error, never a partial dedup.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.neardup.settings import differences
from megatron_andromeda.preprocess.neardup.workdir import (
    NearDupError,
    Plan,
    load_output,
    load_plan,
    require_stage,
    stage_digest,
)
from megatron_andromeda.preprocess.readers import InputFile


class NearDupDrops:
    """The lines to drop of each input file of a preprocessing run, from a near-dup run."""

    def __init__(self, plan: Plan, report: dict, signatures: list[dict], inputs: list[int]) -> None:
        self.plan = plan
        self.report = report
        self._signatures = signatures
        self._inputs = inputs  # preprocessing file index -> near-dup input index
        self._drops = []
        for index in inputs:
            name = f"{index:05d}"
            shape = (report["inputs"][index]["dropped"],)
            self._drops.append(
                np.asarray(load_output(plan, "clusters", report["outputs"][name], shape, np.int64))
            )

    @classmethod
    def open(
        cls,
        work_dir: str,
        files: Sequence[InputFile],
        json_keys: Sequence[str],
        cleaning: CleaningConfig | None,
    ) -> NearDupDrops:
        """Check that `work_dir` holds a finished near-dup run that fits these files and settings."""
        plan = load_plan(work_dir)
        signatures = require_stage(plan, "signatures")
        report = require_stage(plan, "clusters")[0]
        if report.get("upstream") != stage_digest(require_stage(plan, "buckets")):
            raise NearDupError(
                f"{plan.marker_path('clusters', 0)}: made from bucket outputs that have been redone since; "
                f"rerun `tools/neardup.py cluster --work-dir {plan.work_dir}` first"
            )
        _check_settings(plan, json_keys, cleaning)
        by_path = {os.path.realpath(p): i for i, p in enumerate(plan.inputs)}
        inputs = []
        for spec in files:
            index = by_path.get(os.path.realpath(spec.path))
            if index is None:
                raise NearDupError(
                    f"{spec.path}: not an input of the near-dup run {plan.work_dir} (its plan.json lists "
                    f"{len(plan.inputs)} files, e.g. {plan.inputs[0]}); run near-dup over this file too"
                )
            signed = signatures[index]["input"]["bytes"]
            if spec.size != signed:
                raise NearDupError(
                    f"{spec.path}: {spec.size} bytes, but the near-dup run {plan.work_dir} signed it at "
                    f"{signed} bytes; the file changed: rerun near-dup in a new --work-dir"
                )
            inputs.append(index)
        return cls(plan, report, signatures, inputs)

    def mask(self, file_index: int, lines: np.ndarray) -> np.ndarray:
        """(K,) bool: which of these lines of preprocessing input `file_index` are dropped."""
        drops = self._drops[file_index]
        where = np.minimum(np.searchsorted(drops, lines), max(drops.size - 1, 0))
        return drops[where] == lines if drops.size else np.zeros(lines.shape, dtype=bool)

    def verify_inputs(self, hashed: Sequence[dict]) -> None:
        """Refuse the run when an input's content is not what the near-dup run signed."""
        for file_index, entry in enumerate(hashed):
            signed = self._signatures[self._inputs[file_index]]["input"]["sha256"]
            if entry["sha256"] != signed:
                raise NearDupError(
                    f"{entry['path']}: content sha256 {entry['sha256'][:16]}... differs from what the "
                    f"near-dup run {self.plan.work_dir} signed ({signed[:16]}...); rerun near-dup on the "
                    "current files"
                )

    def summary(self) -> dict:
        """What the preprocessing sidecar records of the near-dup run (merge_datasets compares it)."""
        s = self.plan.settings
        report = self.report
        return {"work_dir": self.plan.work_dir, "run_id": self.plan.run_id, "num_perm": s.num_perm,
                "ngram": s.ngram, "bands": s.bands, "rows": s.rows, "inputs": len(self.plan.inputs),
                "clusters": report["clusters"], "dropped": report["documents"]["dropped"]}  # fmt: skip


def _check_settings(plan: Plan, json_keys: Sequence[str], cleaning: CleaningConfig | None) -> None:
    recorded = plan.settings
    if tuple(json_keys) != recorded.json_keys:
        raise NearDupError(
            f"--json-keys {list(json_keys)}: the near-dup run {plan.work_dir} read "
            f"{list(recorded.json_keys)}; use the same keys, or a near-dup run made with these"
        )
    ours = None if cleaning is None else json.loads(json.dumps(dataclasses.asdict(cleaning)))
    theirs = recorded.as_dict()["cleaning"]
    if (ours is None) != (theirs is None):
        state = {True: "off (--no-clean)", False: "on"}
        raise NearDupError(
            f"--near-dup-dir {plan.work_dir}: cleaning is {state[theirs is None]} there but "
            f"{state[ours is None]} here; both must decide alike which records are documents"
        )
    diffs = [] if ours is None else differences(ours, theirs, "cleaning.")
    if diffs:
        raise NearDupError(
            f"--near-dup-dir {plan.work_dir}: the near-dup run cleaned with other rules ({'; '.join(diffs)}, "
            "'expected' being the near-dup run's); use the same cleaning flags"
        )
