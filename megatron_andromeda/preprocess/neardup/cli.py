"""Command line of `tools/neardup.py`: init, the three stages (one task or all of them), run, status."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_andromeda.preprocess.cli import add_cleaning_flags, cleaning_from_args
from megatron_andromeda.preprocess.neardup.runner import run_all, run_stage, select_tasks, upstream_digest
from megatron_andromeda.preprocess.neardup.settings import (
    DEFAULT_BANDS,
    DEFAULT_NGRAM,
    DEFAULT_NUM_PERM,
    DEFAULT_ROWS,
    NearDupSettings,
)
from megatron_andromeda.preprocess.neardup.workdir import (
    STAGES,
    NearDupError,
    Plan,
    init_plan,
    load_plan,
    read_marker,
    task_done,
)
from megatron_andromeda.preprocess.readers import InputError

DESCRIPTION = "Near-duplicate removal across machines: MinHash signatures, LSH buckets, clusters, drop lists."


def _defaults() -> str:
    d = NearDupSettings()
    p = d.candidate_probability
    return (
        f"defaults: {d.num_perm} permutations of word {d.ngram}-gram shingles, {d.bands} bands x "
        f"{d.rows} rows:\na pair becomes a candidate with probability 1/2 at Jaccard {d.threshold:.2f}, "
        f"{p(0.8):.2f} at 0.8,\n{p(0.5):.2f} at 0.5. Chosen on the labelled benchmark (F1 of every setting: "
        'tools/neardup_quality.py\n--sweep; README "Near-duplicates across machines"). --threshold T '
        "picks bands x rows for another T."
    )


EPILOG = f"""\
stages (each a set of independent tasks over the shared --work-dir; a rerun skips finished tasks):
  init        write WORK_DIR/plan.json: the inputs in global order and the settings
  signatures  one task per input file: documents (after the same cleaning as preprocess_data.py)
              and their MinHash LSH band keys
  buckets     one task per --bands-per-task bands: candidate pairs of documents sharing a band key
  cluster     one task: union-find over the pairs; in each cluster the earliest document (input
              order) is kept; a drop list per input file and the report WORK_DIR/clusters/report.json
  run         init + every stage in a local process pool (--workers)
then: tools/preprocess_data.py --input FILES --near-dup-dir WORK_DIR ... (any share of the inputs
per machine) and tools/merge_datasets.py to join those runs.

{_defaults()}

Slurm: examples/launch/dedup.sbatch submits the stages as job arrays chained with --dependency;
plain processes: `neardup.py signatures --work-dir W --task I` (I = 0 .. inputs - 1), etc.
"""


def _settings_flags(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("input")
    io.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_GLOB",
        help="the whole corpus, in its global order (as preprocess_data.py reads it)",
    )
    io.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY")
    lsh = p.add_argument_group("MinHash / LSH")
    lsh.add_argument("--num-perm", type=int, default=DEFAULT_NUM_PERM, help="signature length")
    lsh.add_argument("--ngram", type=int, default=DEFAULT_NGRAM, help="words per shingle")
    lsh.add_argument("--bands", type=int, default=None, help=f"LSH bands (default {DEFAULT_BANDS})")
    lsh.add_argument("--rows", type=int, default=None, help=f"rows per band (default {DEFAULT_ROWS})")
    lsh.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Jaccard similarity to separate at: picks --bands/--rows (instead of giving them)",
    )
    lsh.add_argument("--bands-per-task", type=int, default=1, help="bands per bucket task")
    lsh.add_argument("--max-samples", type=int, default=10, help="sample clusters in the report")
    clean = p.add_argument_group(
        "cleaning (must match the preprocess_data.py runs that apply the drop lists)"
    )
    add_cleaning_flags(clean)


def _task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        type=int,
        default=_env_int("SLURM_ARRAY_TASK_ID"),
        help="run this task only (default: $SLURM_ARRAY_TASK_ID, else every pending task)",
    )
    p.add_argument(
        "--array-size",
        type=int,
        default=None,
        help="with --task: also run tasks task + k * array-size (arrays smaller than the stage)",
    )
    p.add_argument("--workers", type=int, default=1, help="local processes for pending tasks")  # fmt: skip


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neardup.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("init", "write the plan"), ("run", "init, then every stage locally")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--work-dir", required=True)
        _settings_flags(cmd)
        if name == "run":
            cmd.add_argument("--workers", type=int, default=1, help="local processes")
    for stage, aliases in (("signatures", []), ("buckets", []), ("cluster", ["clusters"])):
        cmd = sub.add_parser(stage, aliases=aliases, help=f"stage {stage!r}")
        cmd.add_argument("--work-dir", required=True)
        _task_flags(cmd)
    status = sub.add_parser("status", help="finished / pending tasks of each stage")
    status.add_argument("--work-dir", required=True)
    status.add_argument("--tasks", action="store_true", help="print 'STAGE TASKS' lines only (for scripts)")
    return p


def settings_from_args(args: argparse.Namespace) -> NearDupSettings:
    common = dict(
        num_perm=args.num_perm, ngram=args.ngram, json_keys=tuple(args.json_keys),
        cleaning=cleaning_from_args(args), bands_per_task=args.bands_per_task, max_samples=args.max_samples,
    )  # fmt: skip
    if args.threshold is not None:
        if args.bands is not None or args.rows is not None:
            raise ValueError("give either --threshold or --bands and --rows, not both")
        if not 0.0 < args.threshold < 1.0:
            raise ValueError(f"--threshold {args.threshold}: must be strictly between 0 and 1")
        return NearDupSettings.for_threshold(args.threshold, **common)
    if (args.bands is None) != (args.rows is None):
        raise ValueError("give --bands and --rows together (or --threshold)")
    bands = DEFAULT_BANDS if args.bands is None else args.bands
    rows = DEFAULT_ROWS if args.rows is None else args.rows
    return NearDupSettings(bands=bands, rows=rows, **common)


def print_status(plan: Plan, tasks_only: bool) -> None:
    if tasks_only:
        for stage in STAGES:
            print(stage, plan.num_tasks(stage))
        return
    s = plan.settings
    print(f"{plan.work_dir}: run {plan.run_id}, {len(plan.inputs)} inputs, {s.num_perm} permutations, "
          f"{s.bands} bands x {s.rows} rows (threshold ~{s.threshold:.2f})")  # fmt: skip
    for stage in STAGES:
        try:
            upstream = upstream_digest(plan, stage)
        except NearDupError:
            print(f"  {stage}: waiting for the stage before it")
            continue
        finished = sum(task_done(plan, stage, t, upstream) for t in range(plan.num_tasks(stage)))
        print(f"  {stage}: {finished} of {plan.num_tasks(stage)} tasks finished")


def report_lines(report: dict) -> list[str]:
    docs = report["documents"]
    lines = [
        f"read {docs['read']:,} records, {docs['in']:,} documents; {report['clusters']:,} clusters, "
        f"{docs['dropped']:,} documents dropped, {docs['kept']:,} kept "
        f"({report['candidate_pairs']:,} candidate pairs)"
    ]
    for sample in report["sample_clusters"][:3]:
        lines.append(f"  e.g. kept {sample['kept']}, dropped {', '.join(sample['dropped'][:2])}"
                     + (f" (+{sample['size'] - 3} more)" if sample["size"] > 3 else ""))  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("init", "run"):
            plan = init_plan(args.work_dir, args.input, settings_from_args(args))
            print(f"plan: {plan.work_dir}/plan.json (run {plan.run_id}, {len(plan.inputs)} inputs, "
                  f"{plan.num_tasks('buckets')} bucket tasks)")  # fmt: skip
            if args.command == "run":
                run_all(plan, workers=args.workers)
                report_marker = read_marker(plan, "clusters", 0)
                print("\n".join(report_lines(report_marker)))
        elif args.command == "status":
            print_status(load_plan(args.work_dir), args.tasks)
        else:
            stage = "clusters" if args.command in ("cluster", "clusters") else args.command
            plan = load_plan(args.work_dir)
            tasks = select_tasks(plan, stage, args.task, args.array_size)
            result = run_stage(plan, stage, tasks, workers=args.workers)
            print(f"{stage}: {len(result.ran)} tasks run, {len(result.skipped)} already finished")
            if stage == "clusters":
                print("\n".join(report_lines(read_marker(plan, "clusters", 0))))
    except (NearDupError, InputError, ValueError) as e:
        print(f"neardup.py: error: {e}", file=sys.stderr)
        return 2
    return 0
