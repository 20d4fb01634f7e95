#!/usr/bin/env python3
"""Plot loss and throughput curves from one or more runs' metrics.jsonl into a PNG.

    python tools/plot_metrics.py --metrics runs/a/metrics.jsonl runs/b/metrics.jsonl --output curves.png

Top panel: training loss (lines) and validation loss (dots on a dashed line) against the step;
bottom panel: training throughput in tokens/s. Each run is named after its directory, or
`LABEL=PATH`. A run still being written may end in a half-written line: it is skipped with a
warning; any other unreadable line is an error naming the file and line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from megatron_andromeda.errors import print_error, report_user_errors


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (see megatron_andromeda/training/metrics.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--metrics {path}: file not found (the trainer writes RUN_DIR/metrics.jsonl)"
        )
    lines = path.read_text().splitlines()
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if line_no == len(lines):  # the trainer was writing it when we read the file
                print(f"warning: {path}:{line_no}: incomplete last line skipped", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or "step" not in record or "kind" not in record:
            raise ValueError(f"{path}:{line_no}: a metrics record needs 'kind' and 'step'")
        records.append(record)
    return records


def series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `kind`, skipping records without a number there."""
    points = [
        (r["step"], r[key]) for r in records if r["kind"] == kind and isinstance(r.get(key), int | float)
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(runs: dict[str, list[dict[str, Any]]], title: str = "") -> Figure:
    """A two-panel figure (loss, throughput) with one line per run and curve."""
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax_loss, ax_speed = fig.subplots(2, 1, sharex=True)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps, loss = series(records, "train", "loss")
        if steps:
            ax_loss.plot(steps, loss, color=color, label=f"{label} train")
        steps, loss = series(records, "valid", "loss")
        if steps:
            ax_loss.plot(steps, loss, color=color, linestyle="--", marker="o", label=f"{label} valid")
        steps, speed = series(records, "train", "tokens_per_s")
        if steps:
            ax_speed.plot(steps, speed, color=color, label=label)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.set_ylim(bottom=0)  # throughput noise looks like collapse on a zoomed axis
    ax_speed.set_xlabel("step")
    for ax in (ax_loss, ax_speed):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def save_png(fig: Figure, output: str | Path) -> None:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def run_label(spec: str) -> tuple[str, str]:
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        return label, path
    return Path(spec).resolve().parent.name, spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.jsonl files ([LABEL=]PATH)")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for label, path in map(run_label, args.metrics):
            key, n = label, 2
            while key in runs:  # two runs/*/metrics.jsonl under same-named directories
                key, n = f"{label} ({n})", n + 1
            runs[key] = read_metrics(path)
    except (FileNotFoundError, ValueError) as e:
        return print_error(e, "plot_metrics")
    if not any(series(r, "train", "loss")[0] or series(r, "valid", "loss")[0] for r in runs.values()):
        print("error: no loss records in the given files", file=sys.stderr)
        return 2
    fig = plot_metrics(runs, args.title)
    save_png(fig, args.output)
    print(f"wrote {args.output} ({sum(len(ax.lines) for ax in fig.axes)} curves)")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
