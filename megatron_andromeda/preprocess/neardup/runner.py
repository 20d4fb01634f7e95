"""Running stages: one task (a Slurm array task, a plain process), or every pending task of a stage
in a local process pool. There is no scheduler here: Slurm's arrays and dependencies, or the pool,
decide where tasks run; a task only needs the shared directory.

A task that fails does not stop the others of its stage; the stage then reports every failure, and
running it again redoes only the tasks without a valid marker.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_andromeda.preprocess.neardup.buckets import bucket_task
from megatron_andromeda.preprocess.neardup.clusters import cluster_task
from megatron_andromeda.preprocess.neardup.signatures import signature_task
from megatron_andromeda.preprocess.neardup.workdir import (
    STAGES,
    NearDupError,
    Plan,
    load_plan,
    require_stage,
    stage_digest,
    task_done,
)
from megatron_andromeda.preprocess.readers import InputError

TASKS: dict[str, Callable[[Plan, int], dict]] = {
    "signatures": signature_task,
    "buckets": bucket_task,
    "clusters": cluster_task,
}
EXPECTED_ERRORS = (NearDupError, InputError, OSError, ValueError)  # reported as one line, no traceback


@dataclass
class StageResult:
    stage: str
    ran: list[int]
    skipped: list[int]


def upstream_digest(plan: Plan, stage: str) -> str | None:
    """Digest of the stage before `stage` (None for the first); refuses an unfinished one."""
    position = STAGES.index(stage)
    return None if position == 0 else stage_digest(require_stage(plan, STAGES[position - 1]))


def select_tasks(plan: Plan, stage: str, task: int | None, array_size: int | None) -> list[int]:
    """All tasks, or those of one array task: `task`, `task + array_size`, ... (an array may be
    smaller than the stage, say with Slurm's MaxArraySize; larger, and the extra ones have none)."""
    count = plan.num_tasks(stage)
    if task is None:
        return list(range(count))
    if task < 0 or (array_size is not None and array_size < 1):
        raise NearDupError(f"--task {task} / --array-size {array_size}: must be >= 0 / >= 1")
    if array_size is None and task >= count:
        raise NearDupError(f"--task {task}: stage {stage!r} has {count} tasks (0-{count - 1})")
    return list(range(task, count, array_size)) if array_size else [task]


def run_task(work_dir: str, stage: str, task: int) -> dict:
    """One task, from the directory alone (what a pool worker or an array task runs)."""
    return TASKS[stage](load_plan(work_dir), task)


def _run_caught(args: tuple[str, str, int]) -> tuple[int, str | None, float]:
    work_dir, stage, task = args
    start = time.perf_counter()
    try:
        run_task(work_dir, stage, task)
    except EXPECTED_ERRORS as e:
        return task, f"{type(e).__name__}: {e}", time.perf_counter() - start
    except Exception:  # a bug: keep the traceback
        return task, traceback.format_exc(), time.perf_counter() - start
    return task, None, time.perf_counter() - start


def run_stage(
    plan: Plan, stage: str, tasks: Sequence[int] | None = None, workers: int = 0, log: bool = True
) -> StageResult:
    """Run the pending ones of `tasks` (default: all) of `stage`, `workers` at a time (0: here)."""
    wanted = list(range(plan.num_tasks(stage))) if tasks is None else list(tasks)
    upstream = upstream_digest(plan, stage)
    todo = [t for t in wanted if not task_done(plan, stage, t, upstream)]
    skipped = [t for t in wanted if t not in set(todo)]
    if log and skipped:
        print(f"[neardup] {stage}: {len(skipped)} of {len(wanted)} tasks already finished", file=sys.stderr)
    jobs = [(plan.work_dir, stage, t) for t in todo]
    if workers <= 1 or len(todo) <= 1:
        results = map(_run_caught, jobs)
        failures = _collect(stage, results, len(todo), log)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo))) as pool:
            failures = _collect(stage, pool.imap_unordered(_run_caught, jobs), len(todo), log)
    if failures:
        detail = "\n".join(f"  task {t}: {message.strip()}" for t, message in sorted(failures.items()))
        raise NearDupError(
            f"stage {stage!r}: {len(failures)} of {len(todo)} tasks failed (finished tasks are kept; "
            f"run the stage again to redo only the failed ones):\n{detail}"
        )
    return StageResult(stage, todo, skipped)


def _collect(stage: str, results, total: int, log: bool) -> dict[int, str]:
    failures = {}
    for done, (task, error, seconds) in enumerate(results, 1):
        if error is not None:
            failures[task] = error
        if log:
            state = "FAILED" if error else "done"
            print(
                f"[neardup] {stage} task {task} {state} in {seconds:.1f} s ({done}/{total})", file=sys.stderr
            )
    return failures


def run_all(plan: Plan, workers: int = 0, log: bool = True) -> list[StageResult]:
    """Every stage in order, each skipping its finished tasks."""
    return [run_stage(plan, stage, workers=workers, log=log) for stage in STAGES]
