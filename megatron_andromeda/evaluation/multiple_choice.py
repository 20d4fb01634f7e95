"""Zero-shot multiple choice by log-likelihood: the model's answer is the most likely choice.

Task files are local JSONL. Our own format is one object per line,

    {"context": "Question: ...\\nAnswer:", "choices": [" yes", " no"], "label": 0}

and records in the public layouts of PIQA, HellaSwag, ARC and BoolQ are converted on load into
the same shape, with prompts in the usual zero-shot style ("Question: ...\\nAnswer:"). Two scores
are reported, as lm-evaluation-harness does: `acc` takes the choice with the highest summed
log-probability; `acc_norm` divides it by the choice's length in characters first, which removes
the bias towards short answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_andromeda.data.jsonl import iter_jsonl
from megatron_andromeda.errors import UserError
from megatron_andromeda.evaluation.scoring import EvalModel, continuation_logprobs, encode_pair


class TaskError(UserError, ValueError):
    """A task file or record that cannot be used; the message names the file and line."""

    label = "task error"


@dataclass
class MCExample:
    context: str
    choices: list[str]
    label: int


# ------------------------------------------------------------------------------------------- loaders
def _native(r: dict[str, Any]) -> MCExample:
    return MCExample(r["context"], list(r["choices"]), int(r["label"]))


def _piqa(r: dict[str, Any]) -> MCExample:
    return MCExample(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))


def _clean_hellaswag(text: str) -> str:
    """WikiHow contexts carry markup such as ' [title]' and '[step]'; keep the prose only."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict[str, Any]) -> MCExample:
    context = r["ctx"] if "ctx" in r else f"{r['ctx_a']} {r['ctx_b'].capitalize()}"
    if r.get("activity_label"):
        context = f"{r['activity_label']}: {context}"
    endings = [" " + _clean_hellaswag(e) for e in r["endings"]]
    return MCExample(_clean_hellaswag(context), endings, int(r["label"]))


def _arc(r: dict[str, Any]) -> MCExample:
    question = r["question"]
    if isinstance(question, dict):  # AI2's own layout: {"question": {"stem", "choices": [{text, label}]}}
        stem, texts, labels = (
            question["stem"],
            [c["text"] for c in question["choices"]],
            [c["label"] for c in question["choices"]],
        )
    else:  # Hugging Face layout: {"question", "choices": {"text": [...], "label": [...]}}
        stem, texts, labels = question, r["choices"]["text"], r["choices"]["label"]
    if r["answerKey"] not in labels:
        raise TaskError(f"answerKey {r['answerKey']!r} is not among the choice labels {labels}")
    return MCExample(f"Question: {stem}\nAnswer:", [" " + t for t in texts], labels.index(r["answerKey"]))


def _boolq(r: dict[str, Any]) -> MCExample:
    answer = r["answer"] if "answer" in r else r["label"]
    question = r["question"].rstrip("?")
    return MCExample(f"{r['passage']}\nQuestion: {question}?\nAnswer:", [" no", " yes"], int(bool(answer)))


LOADERS: dict[str, Callable[[dict[str, Any]], MCExample]] = {
    "native": _native,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "arc": _arc,
    "boolq": _boolq,
}


def detect_mc_format(record: Any) -> str | None:
    """Which loader reads this record, or None when it is not a multiple-choice record."""
    if not isinstance(record, dict):
        return None
    if {"context", "choices", "label"} <= record.keys() and isinstance(record["choices"], list):
        return "native"
    if {"goal", "sol1", "sol2"} <= record.keys():
        return "piqa"
    if "endings" in record:
        return "hellaswag"
    if "answerKey" in record:
        return "arc"
    if {"passage", "question"} <= record.keys() and ("answer" in record or "label" in record):
        return "boolq"
    return None


def load_mc_task(path: str, fmt: str | None = None, limit: int | None = None) -> list[MCExample]:
    """Examples of a JSONL task file; every problem is a TaskError naming `path:line`."""
    examples = []
    for line_no, record in iter_jsonl(path, TaskError) if limit != 0 else ():
        where = f"{path}:{line_no}"
        kind = fmt or detect_mc_format(record)
        if kind not in LOADERS:
            raise TaskError(
                f"{where}: not a multiple-choice record of a known layout ({', '.join(LOADERS)}); "
                'expected {"context": str, "choices": [str], "label": int}'
            )
        try:
            example = LOADERS[kind](record)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TaskError(f"{where}: bad {kind} record ({type(e).__name__}: {e})") from e
        if len(example.choices) < 2 or not 0 <= example.label < len(example.choices):
            raise TaskError(f"{where}: needs 2+ choices and 0 <= label < {len(example.choices)}")
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise TaskError(f"{path}: no examples")
    return examples


# ------------------------------------------------------------------------------------------- scoring
def score_multiple_choice(em: EvalModel, examples: list[MCExample]) -> dict[str, Any]:
    """acc and acc_norm (with standard errors), the chance level, and each example's predicted choices."""
    requests = [encode_pair(em.tokenizer, ex.context, choice) for ex in examples for choice in ex.choices]
    scores = iter(continuation_logprobs(em, requests))
    hits, hits_norm, predictions = 0, 0, []
    for ex in examples:
        logps = [next(scores)[0] for _ in ex.choices]
        pred = max(range(len(logps)), key=logps.__getitem__)
        pred_norm = max(range(len(logps)), key=lambda c: logps[c] / max(len(ex.choices[c]), 1))
        hits += pred == ex.label
        hits_norm += pred_norm == ex.label
        predictions.append({"pred": pred, "pred_norm": pred_norm, "label": ex.label, "logprobs": logps})
    n = len(examples)
    return {
        "n": n,
        "chance": sum(1 / len(ex.choices) for ex in examples) / n,  # the accuracy of guessing
        "acc": hits / n,
        "acc_stderr": _stderr(hits / n, n),
        "acc_norm": hits_norm / n,
        "acc_norm_stderr": _stderr(hits_norm / n, n),
        "predictions": predictions,
    }


def _stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of n 0/1 outcomes (sample variance, as the harness reports)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
