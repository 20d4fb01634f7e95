"""Runs a list of local tasks and held-out datasets on one model and tabulates the results."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from megatron_andromeda.data.checks import DataUse, check_datasets
from megatron_andromeda.data.indexed_dataset import dataset_exists
from megatron_andromeda.data.jsonl import iter_jsonl
from megatron_andromeda.data.sft_dataset import sft_prefixes
from megatron_andromeda.evaluation.generation_tasks import (
    is_generation_record,
    load_generation_task,
    score_generation,
)
from megatron_andromeda.evaluation.multiple_choice import (
    TaskError,
    detect_mc_format,
    load_mc_task,
    score_multiple_choice,
)
from megatron_andromeda.evaluation.perplexity import prefix_perplexity
from megatron_andromeda.evaluation.scoring import EvalModel


def named(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); a bare path is named after its file (extensions dropped)."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
        return name, path
    base = os.path.basename(spec.rstrip("/"))
    for suffix in (".gz", ".zst", ".jsonl", ".json"):
        base = base.removesuffix(suffix)
    return base, spec


def task_kind(path: str) -> str:
    """'multiple_choice' or 'generation', from the task file's first record."""
    if not os.path.isfile(path):
        raise TaskError(f"--tasks {path}: file not found (task files are local JSONL; nothing is downloaded)")
    for line_no, record in iter_jsonl(path, TaskError):
        if detect_mc_format(record):
            return "multiple_choice"
        if is_generation_record(record):
            return "generation"
        raise TaskError(
            f"{path}:{line_no}: neither a multiple-choice record (context/choices/label, or PIQA, "
            "HellaSwag, ARC, BoolQ) nor a generation record (context/answers)"
        )
    raise TaskError(f"{path}: no records")


def run_task(
    em: EvalModel, spec: str, limit: int | None = None, max_new_tokens: int = 32, chat: bool = False
) -> dict[str, Any]:
    name, path = named(spec)
    kind = task_kind(path)
    if kind == "multiple_choice":
        metrics = score_multiple_choice(em, load_mc_task(path, limit=limit))
    else:
        metrics = score_generation(em, load_generation_task(path, limit=limit), max_new_tokens, chat=chat)
    return {"name": name, "kind": kind, "path": path, **metrics}


def check_valid_data(
    em: EvalModel, valid_data: Sequence[str], allow_tokenizer_mismatch: bool = False
) -> None:
    """The checks of data/checks.py on each `--valid-data` dataset (a chat dataset's token file)."""
    uses = []
    for spec in valid_data:
        _, prefix = named(spec)
        text_prefix, mask_prefix = sft_prefixes(prefix)
        chat = dataset_exists(text_prefix) and dataset_exists(mask_prefix)
        uses.append(DataUse(text_prefix if chat else prefix, "--valid-data"))
    check_datasets(
        uses, em.tokenizer, override="--allow-tokenizer-mismatch",
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
    )  # fmt: skip


def evaluate(
    em: EvalModel,
    tasks: Sequence[str] = (),
    valid_data: Sequence[str] = (),
    seq_length: int | None = None,
    max_tokens: int | None = None,
    limit: int | None = None,
    max_new_tokens: int = 32,
    chat: bool = False,
    allow_tokenizer_mismatch: bool = False,
) -> dict[str, Any]:
    """All results as one JSON-ready dict: `perplexity` rows and `tasks` rows.

    Every dataset is checked first (tokenizer recorded in its sidecar, token ids, not empty): scoring
    data from another tokenizer gives numbers that look fine and mean nothing.
    """
    check_valid_data(em, valid_data, allow_tokenizer_mismatch)
    perplexity = []
    for spec in valid_data:
        name, prefix = named(spec)
        perplexity.append(prefix_perplexity(em, prefix, seq_length, max_tokens, name).to_dict())
    results = [run_task(em, spec, limit, max_new_tokens, chat) for spec in tasks]
    return {"perplexity": perplexity, "tasks": results}


def markdown_report(results: dict[str, Any]) -> str:
    """Markdown tables of the metrics (predictions stay in the JSON)."""
    tables = []
    if results.get("perplexity"):
        rows = [
            [r["name"], r["source"], r["split"], f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['ppl']:.2f}"]
            for r in results["perplexity"]
        ]
        tables.append(_table(["dataset", "source", "split", "tokens", "loss", "ppl"], rows))
    tasks = results.get("tasks", [])
    rows = [
        [t["name"], str(t["n"]), _pct(t["acc"], t["acc_stderr"]), _pct(t["acc_norm"], t["acc_norm_stderr"]),
         _pct(t["chance"], None) if "chance" in t else "?"]
        for t in tasks
        if t["kind"] == "multiple_choice"
    ]  # fmt: skip
    if rows:  # chance: what guessing scores, so that 21.7% on six choices reads as "a little above 16.7%"
        tables.append(_table(["task", "n", "acc", "acc_norm", "chance"], rows))
    rows = [
        [t["name"], str(t["n"]), f"{100 * t['exact_match']:.1f}", f"{100 * t['f1']:.1f}", f"{t['bleu']:.2f}"]
        for t in tasks
        if t["kind"] == "generation"
    ]
    if rows:
        tables.append(_table(["task", "n", "exact match", "F1", "BLEU"], rows))
    return "\n\n".join(tables) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; every column but the first is right-aligned (they hold numbers)."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def _pct(value: float, stderr: float | None) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")
