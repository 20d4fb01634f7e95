#!/usr/bin/env python3
"""Precision, recall and F1 of near-dedup on a labelled benchmark (tools/make_neardup_benchmark.py).

    python tools/neardup_quality.py --benchmark bench/neardup.jsonl                 # default settings
    python tools/neardup_quality.py --benchmark bench/neardup.jsonl --bands 9 --rows 14
    python tools/neardup_quality.py --benchmark bench/neardup.jsonl --sweep [--json sweep.json]

Without --sweep, runs every stage of tools/neardup.py over the benchmark file (in --work-dir, or a
temporary directory) and scores its drop list: a dropped document is right when the labels drop it
(all members of a family but its first), wrong when they keep it. Prints the scores per edit too.
With --sweep, scores every bands x rows whose S-curve midpoint lies in [0.4, 0.95] from signatures
computed once, best first, then the best F1 per number of rows: the curve the defaults come from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from megatron_andromeda.errors import report_user_errors
from megatron_andromeda.preprocess.neardup.quality import (
    breakdown,
    default_grid,
    drops_for,
    pipeline_drops,
    read_benchmark,
    score,
    signatures_of,
    sweep,
)
from megatron_andromeda.preprocess.neardup.settings import NearDupSettings
from megatron_andromeda.preprocess.neardup.workdir import NearDupError


def settings_from(args: argparse.Namespace) -> NearDupSettings:
    if args.threshold is not None:
        return NearDupSettings.for_threshold(args.threshold, num_perm=args.num_perm)
    default = NearDupSettings()
    bands = default.bands if args.bands is None else args.bands
    rows = default.rows if args.rows is None else args.rows
    return NearDupSettings(num_perm=args.num_perm, bands=bands, rows=rows)


def print_sweep(rows: list[dict], default: NearDupSettings, top: int) -> None:
    rows = sorted(rows, key=lambda r: (-r["f1"], -r["precision"]))
    print(f"{'bands':>5} {'rows':>4} {'midpoint':>8} {'precision':>9} {'recall':>7} {'F1':>7}  (best {top})")
    for r in rows[:top]:
        mark = "  <- default" if (r["bands"], r["rows"]) == (default.bands, default.rows) else ""
        print(f"{r['bands']:>5} {r['rows']:>4} {r['threshold']:>8.3f} {r['precision']:>9.4f} "
              f"{r['recall']:>7.4f} {r['f1']:>7.4f}{mark}")  # fmt: skip
    print("\nbest F1 per rows per band (the curve):")
    for n in sorted({r["rows"] for r in rows}):
        best = max((r for r in rows if r["rows"] == n), key=lambda r: r["f1"])
        print(f"  rows {n:>2}: F1 {best['f1']:.4f} at {best['bands']} bands "
              f"(midpoint {best['threshold']:.3f}, P {best['precision']:.4f}, "
              f"R {best['recall']:.4f})")  # fmt: skip
    ours = next((r for r in rows if (r["bands"], r["rows"]) == (default.bands, default.rows)), None)
    if ours is not None:
        rank = rows.index(ours) + 1
        print(f"\ndefault {default.bands} x {default.rows}: F1 {ours['f1']:.4f}, rank {rank} of {len(rows)} "
              f"(best {rows[0]['f1']:.4f})")  # fmt: skip


def evaluate(args: argparse.Namespace, records: list[dict], settings: NearDupSettings) -> None:
    with tempfile.TemporaryDirectory(prefix="neardup_quality_") as tmp:
        dropped = pipeline_drops(args.benchmark, args.work_dir or tmp, settings, workers=args.workers)
    index, signatures = signatures_of(records, settings)
    if dropped != drops_for(index, signatures, settings.bands, settings.rows):
        raise NearDupError("the stages and the in-memory computation disagree: a bug, please report it")
    s = score(records, dropped)
    print(f"{settings.num_perm} permutations, {settings.bands} bands x {settings.rows} rows "
          f"(midpoint {settings.threshold:.3f}) on {len(records)} records:")  # fmt: skip
    print(f"  precision {s.precision:.4f}  recall {s.recall:.4f}  F1 {s.f1:.4f}  "
          f"({s.true_positives} right drops, {s.false_positives} wrong, "
          f"{s.false_negatives} missed)")  # fmt: skip
    print(f"  {'kind/edit':>28} {'records':>8} {'dropped':>8} {'should':>7} {'wrong':>6} {'missed':>7}")
    for name, row in breakdown(records, dropped).items():
        print(f"  {name:>28} {row['records']:>8} {row['dropped']:>8} {row['should_drop']:>7} "
              f"{row['wrongly_dropped']:>6} {row['missed']:>7}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, help="JSONL from tools/make_neardup_benchmark.py")
    p.add_argument("--num-perm", type=int, default=NearDupSettings().num_perm)
    p.add_argument("--bands", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None, help="pick bands x rows for this Jaccard")
    p.add_argument("--sweep", action="store_true", help="score every bands x rows (in memory)")
    p.add_argument("--top", type=int, default=15, help="sweep rows to print")
    p.add_argument("--json", default=None, help="write the sweep's rows here")
    p.add_argument("--work-dir", default=None, help="keep the stages' outputs here (default: a temp dir)")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    try:
        records = read_benchmark(args.benchmark)
        settings = settings_from(args)
        if args.sweep:
            rows = sweep(records, settings, default_grid(settings.num_perm))
            print_sweep(rows, NearDupSettings(), args.top)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        else:
            evaluate(args, records, settings)
    except (OSError, ValueError, KeyError) as e:
        print(f"neardup_quality.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
