#!/usr/bin/env python3
"""Print each stage's data plan: source, tokens in source, proportion, effective tokens, epochs.

    python tools/plan_data.py examples/data/stage1_high_priority.yaml --tokens 2e10
    python tools/plan_data.py examples/data/*.yaml --max-epochs 4

Tokens in a source come from the preprocessing sidecar (`PREFIX.json`, written by
tools/preprocess_data.py) or, failing that, from the train dataset's `.idx`; a source whose data is
not there yet is shown as missing. Warns when a source would be repeated more than --max-epochs
times, and when a source that is also an evaluation set (PIQA, SuperGLUE, GLUE, HumanEval, ...)
appears in a training stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_andromeda.config import ConfigError
from megatron_andromeda.data.indexed_dataset import IndexedDataset, dataset_exists
from megatron_andromeda.data.recipe import Source, StagePlan, load_recipe, plan_stage, stage_token_budget
from megatron_andromeda.errors import report_user_errors


def tokens_in_source(source: Source) -> int | None:
    """Train-split tokens of a source, from its sidecar when present, else from the .idx."""
    train = source.dataset("train")
    sidecar = Path(f"{source.prefix}.json") if source.prefix else None
    if sidecar is not None and sidecar.exists():
        outputs = json.loads(sidecar.read_text()).get("outputs", {})
        for out in outputs.values():
            if str(out.get("prefix", "")).endswith(Path(train).name):
                return int(out["tokens"])
    if dataset_exists(train):
        return IndexedDataset(train).num_tokens
    return None


def format_plan(plan: StagePlan, available: list[int | None]) -> str:
    header = f"stage {plan.recipe.name}: {plan.budget / 1e9:.3g}B tokens ({plan.recipe.path})"
    rows = [("source", "tokens in source", "proportion", "effective tokens", "epochs")]
    for source, tokens in zip(plan.sources, available):
        rows.append((
            source.name,
            _billions(tokens) if tokens is not None else "missing",
            f"{source.proportion:.3f}",
            _billions(source.effective_tokens),
            f"{source.epochs:.2f}" if tokens else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [header]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def recorded_profile(source: Source) -> str | None:
    """The --clean-profile the source's preprocessing run recorded in its sidecar (None: unknown)."""
    sidecar = Path(f"{source.prefix}.json") if source.prefix else None
    if sidecar is None or not sidecar.is_file():
        return None
    options = json.loads(sidecar.read_text()).get("options", {})
    return options.get("clean_profile") or ("none" if options.get("cleaning") is None else None)


def warnings_for(plan: StagePlan, available: list[int | None], max_epochs: float) -> list[str]:
    notes = []
    for source, recipe_source, tokens in zip(plan.sources, plan.recipe.sources, available):
        recorded = recorded_profile(recipe_source)
        if recorded is not None and recorded != recipe_source.clean_profile:
            notes.append(
                f"WARNING {plan.recipe.name}/{source.name}: preprocessed with --clean-profile {recorded}, "
                f"the recipe asks for {recipe_source.clean_profile} (prose rules drop ordinary source "
                "files); rerun tools/preprocess_data.py with the recipe's profile"
            )
        if tokens and source.epochs > max_epochs:
            notes.append(
                f"WARNING {plan.recipe.name}/{source.name}: {source.epochs:.1f} epochs exceeds "
                f"--max-epochs {max_epochs:g}; lower its weight or add data"
            )
        if source.is_evaluation_set and source.proportion > 0:
            notes.append(
                f"WARNING {plan.recipe.name}/{source.name}: also an evaluation set; training on it "
                "contaminates benchmark results (hold out its test split, or evaluate elsewhere)"
            )
        if tokens is None:
            notes.append(
                f"note {plan.recipe.name}/{source.name}: no data at {recipe_source.dataset('train')} yet"
            )
    return notes


def _billions(tokens: float) -> str:
    return f"{tokens / 1e9:.3f}B" if tokens >= 1e7 else f"{tokens / 1e6:.3f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipes", nargs="+", help="stage recipe YAML files, in stage order")
    parser.add_argument(
        "--tokens", type=float, default=None, help="token budget per stage (default: the recipe's)"
    )
    parser.add_argument(
        "--max-epochs", type=float, default=4.0, help="warn above this many epochs of a source"
    )
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = parser.parse_args(argv)
    plans, notes = [], []
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
        except ConfigError as err:
            parser.error(str(err))
        try:
            budget = stage_token_budget(args.tokens, recipe, f"{path} (or --tokens)")
        except ConfigError as err:
            parser.error(str(err))
        available = [tokens_in_source(s) for s in recipe.sources]
        plan = plan_stage(recipe, budget, [t or 0 for t in available])
        plans.append((plan, available))
        notes += warnings_for(plan, available, args.max_epochs)
    if args.json:
        print(json.dumps([_as_json(plan, available) for plan, available in plans], indent=2))
    else:
        print("\n\n".join(format_plan(plan, available) for plan, available in plans))
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def _as_json(plan: StagePlan, available: list[int | None]) -> dict:
    return {
        "stage": plan.recipe.name,
        "budget_tokens": plan.budget,
        "sources": [
            {"source": s.name, "tokens_in_source": t, "proportion": s.proportion,
             "effective_tokens": s.effective_tokens, "epochs": s.epochs if t else None,
             "evaluation_set": s.is_evaluation_set}
            for s, t in zip(plan.sources, available)
        ],
    }  # fmt: skip


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
