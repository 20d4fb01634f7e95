"""The shared directory of a near-dup run: the plan, every task's outputs and completion markers.

    W/plan.json                  inputs in global order, settings, run id (`tools/neardup.py init`)
    W/signatures/NNNNN.keys.npy  (bands, documents) uint64 LSH band keys of input NNNNN
    W/signatures/NNNNN.lines.npy (documents,) int64 line (row) of each document in its input
    W/signatures/NNNNN.json      marker: documents read / kept by cleaning, input size and sha256
    W/buckets/TTTTT.pairs.npy    (pairs, 2) int64 candidate pairs of bucket task TTTTT's bands
    W/buckets/TTTTT.json         marker
    W/clusters/NNNNN.drop.npy    (dropped,) int64 ascending lines of input NNNNN that are dropped
    W/clusters/report.json       marker of the clustering stage, and the run's report

A task writes its data files under temporary names, fsyncs and renames them, then writes its JSON
marker the same way, last. A task counts as finished when its marker exists, was written for this
plan (run id), its outputs still have the recorded sizes, and the digest of the upstream stage it
recorded is the upstream stage's digest now: a rerun skips exactly the finished tasks, and redoes a
task whose inputs were redone since. A stage that reads another's outputs refuses, naming the file,
anything missing, unfinished or made with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.errors import UserError
from megatron_andromeda.preprocess.neardup.settings import NearDupSettings, differences
from megatron_andromeda.preprocess.readers import expand_inputs, file_sha256
from megatron_andromeda.preprocess.report import write_json_atomic

STAGES = ("signatures", "buckets", "clusters")
PLAN_VERSION = 1


class NearDupError(UserError, ValueError):
    """A near-dup run that cannot go on; the message names the file and what to do."""

    label = "neardup error"


@dataclass(frozen=True)
class Plan:
    """A near-dup run: its directory, inputs in global order, and settings."""

    work_dir: str
    inputs: tuple[str, ...]
    settings: NearDupSettings

    @property
    def run_id(self) -> str:
        payload = json.dumps({"inputs": list(self.inputs), "settings": self.settings.as_dict()})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def num_tasks(self, stage: str) -> int:
        if stage == "signatures":
            return len(self.inputs)
        if stage == "buckets":
            return -(-self.settings.bands // self.settings.bands_per_task)
        if stage == "clusters":
            return 1
        raise NearDupError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")

    def bands_of(self, task: int) -> range:
        per = self.settings.bands_per_task
        return range(task * per, min((task + 1) * per, self.settings.bands))

    def path(self, stage: str, name: str) -> str:
        return os.path.join(self.work_dir, stage, name)

    def marker_path(self, stage: str, task: int) -> str:
        return self.path(stage, "report.json" if stage == "clusters" else f"{task:05d}.json")

    def as_dict(self) -> dict:
        return {"version": PLAN_VERSION, "run_id": self.run_id, "inputs": list(self.inputs),
                "settings": self.settings.as_dict()}  # fmt: skip


def plan_path(work_dir: str) -> str:
    return os.path.join(work_dir, "plan.json")


def init_plan(work_dir: str, patterns: Sequence[str], settings: NearDupSettings) -> Plan:
    """Write `W/plan.json`, or reuse the one there when it has the same inputs and settings."""
    inputs = tuple(os.path.abspath(f.path) for f in expand_inputs(patterns))
    plan = Plan(os.path.abspath(work_dir), inputs, settings)
    path = plan_path(work_dir)
    if os.path.exists(path):
        existing = load_plan(work_dir)
        if existing.inputs != plan.inputs:
            raise NearDupError(
                f"{path}: a plan for other inputs ({len(existing.inputs)} files, first "
                f"{existing.inputs[0]}) is already there; use a new --work-dir (or delete this one)"
            )
        diffs = differences(existing.settings.as_dict(), settings.as_dict(), wanted="asked for")
        if diffs:
            raise NearDupError(
                f"{path}: made with other settings ({'; '.join(diffs)}); use a new --work-dir "
                "(or delete this one) to run with these"
            )
        return existing
    for stage in STAGES:
        os.makedirs(os.path.join(work_dir, stage), exist_ok=True)
    write_json_atomic(path, plan.as_dict())
    return plan


def load_plan(work_dir: str) -> Plan:
    path = plan_path(work_dir)
    if not os.path.isfile(path):
        raise NearDupError(
            f"{path}: no near-dup plan; run `tools/neardup.py init --work-dir {work_dir} --input ...` first"
        )
    try:
        with open(path) as f:
            data = json.load(f)
        plan = Plan(
            os.path.abspath(work_dir), tuple(data["inputs"]), NearDupSettings.from_dict(data["settings"])
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NearDupError(f"{path}: not a readable near-dup plan ({e})") from e
    if data.get("run_id") != plan.run_id:
        raise NearDupError(f"{path}: its run_id does not match its inputs and settings (edited by hand?)")
    return plan


# ------------------------------------------------------------------------------------- task outputs
def finish_file(tmp: str, path: str) -> dict:
    """fsync `tmp`, rename it onto `path`; returns the record a marker keeps of it."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def save_npy(path: str, array: np.ndarray) -> dict:
    """`np.save` atomically; returns the marker's record of the file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return finish_file(tmp, path)


def write_marker(plan: Plan, stage: str, task: int, payload: dict) -> dict:
    marker = {"stage": stage, "task": task, "run_id": plan.run_id, "settings": plan.settings.as_dict(),
              **payload}  # fmt: skip
    write_json_atomic(plan.marker_path(stage, task), marker)
    return marker


def read_marker(plan: Plan, stage: str, task: int) -> dict | None:
    """The task's marker, None when there is none; refuses one made by another plan or settings."""
    path = plan.marker_path(stage, task)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise NearDupError(f"{path}: unreadable marker ({e}); delete it to redo the task") from e
    diffs = differences(marker.get("settings", {}), plan.settings.as_dict())
    if diffs:
        raise NearDupError(
            f"{path}: made with other settings than {plan_path(plan.work_dir)} ({'; '.join(diffs)}); "
            f"delete {os.path.dirname(path)} (or use a new --work-dir) to redo it"
        )
    if marker.get("run_id") != plan.run_id or marker.get("task") != task:
        raise NearDupError(
            f"{path}: written for run {marker.get('run_id')} task {marker.get('task')}, not this plan's "
            f"run {plan.run_id} task {task} (copied from another work dir?); delete it to redo the task"
        )
    return marker


def outputs_present(plan: Plan, stage: str, marker: dict) -> bool:
    return all(
        os.path.isfile(plan.path(stage, rec["name"]))
        and os.path.getsize(plan.path(stage, rec["name"])) == rec["bytes"]
        for rec in marker["outputs"].values()
    )


def stage_digest(markers: Sequence[dict]) -> str:
    """Identity of a stage's results: the hashes of every task's outputs, in task order."""
    payload = json.dumps([m["outputs"] for m in markers], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def task_done(plan: Plan, stage: str, task: int, upstream: str | None) -> bool:
    marker = read_marker(plan, stage, task)
    return marker is not None and marker.get("upstream") == upstream and outputs_present(plan, stage, marker)


def require_stage(plan: Plan, stage: str) -> list[dict]:
    """Every task marker of a finished stage, in task order; a clear error when it is not finished."""
    markers = [read_marker(plan, stage, t) for t in range(plan.num_tasks(stage))]
    missing = [t for t, m in enumerate(markers) if m is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise NearDupError(
            f"{plan.marker_path(stage, missing[0])}: stage {stage!r} has not finished ({len(missing)} of "
            f"{len(markers)} tasks pending: {shown}); run `tools/neardup.py {stage} --work-dir "
            f"{plan.work_dir}` first"
        )
    for task, marker in enumerate(markers):
        for rec in marker["outputs"].values():
            path = plan.path(stage, rec["name"])
            if not os.path.isfile(path) or os.path.getsize(path) != rec["bytes"]:
                state = (
                    "missing"
                    if not os.path.isfile(path)
                    else f"{os.path.getsize(path)} bytes, not {rec['bytes']}"
                )
                raise NearDupError(
                    f"{path}: {state}, though {plan.marker_path(stage, task)} says task {task} finished; "
                    f"rerun `tools/neardup.py {stage} --work-dir {plan.work_dir}` (it redoes that task) "
                    "and the stages after it"
                )
    return markers


def load_output(plan: Plan, stage: str, record: dict, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A task's .npy output, memory-mapped, checked against the shape and dtype its marker implies."""
    path = plan.path(stage, record["name"])
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise NearDupError(f"{path}: unreadable ({e}); rerun stage {stage!r} to redo it") from e
    if array.shape != shape or array.dtype != dtype:
        raise NearDupError(
            f"{path}: holds {array.dtype}{list(array.shape)}, its marker implies "
            f"{np.dtype(dtype)}{list(shape)}; rerun stage {stage!r} to redo it"
        )
    return array
