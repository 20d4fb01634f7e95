"""Generation tasks: greedy answers scored by exact match, SQuAD-style F1 and BLEU.

Task files are local JSONL, one object per line:

    {"context": "Question: Who wrote Emma?\\nAnswer:", "answers": ["Jane Austen"]}

(`prompt` / `question` are accepted for `context`, and `answer` / `target` for `answers`). The
model answers greedily until a newline or the end-of-document token. Exact match and F1 compare
answers after SQuAD's normalisation (lower case, no punctuation, no articles, single spaces) and
take the best over the references; BLEU is sacrebleu's corpus BLEU over all examples.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_andromeda.data.chat_template import ChatTemplate
from megatron_andromeda.data.jsonl import iter_jsonl
from megatron_andromeda.evaluation.multiple_choice import TaskError
from megatron_andromeda.evaluation.scoring import EvalModel, greedy_until

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
CONTEXT_KEYS = ("context", "prompt", "question")
ANSWER_KEYS = ("answers", "answer", "target")


# ------------------------------------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching reference."""
    return max((_f1(prediction, r) for r in references), default=0.0)


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: a match; one empty: nothing in common
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100); examples may have different numbers of references."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    depth = max((len(r) for r in references), default=0)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score


# ------------------------------------------------------------------------------------------- tasks
@dataclass
class GenExample:
    context: str
    answers: list[str]


def is_generation_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and any(k in record for k in CONTEXT_KEYS)
        and any(k in record for k in ANSWER_KEYS)
    )


def load_generation_task(path: str, limit: int | None = None) -> list[GenExample]:
    """Examples of a JSONL generation task; every problem is a TaskError naming `path:line`."""
    examples = []
    for line_no, record in iter_jsonl(path, TaskError) if limit != 0 else ():
        if not is_generation_record(record):
            raise TaskError(
                f"{path}:{line_no}: a generation record needs one of {', '.join(CONTEXT_KEYS)} and one "
                f"of {', '.join(ANSWER_KEYS)}"
            )
        context = next(record[k] for k in CONTEXT_KEYS if k in record)
        answers = next(record[k] for k in ANSWER_KEYS if k in record)
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(context, str) or not answers or not all(isinstance(a, str) for a in answers):
            raise TaskError(f"{path}:{line_no}: context must be a string and answers non-empty strings")
        examples.append(GenExample(context, list(answers)))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise TaskError(f"{path}: no examples")
    return examples


def score_generation(
    em: EvalModel,
    examples: list[GenExample],
    max_new_tokens: int = 32,
    until: Sequence[str] = ("\n",),
    chat: bool = False,
) -> dict[str, Any]:
    """exact_match and f1 (means over examples, 0-1), bleu (0-100) and each example's answer.

    With `chat`, each context is asked as the user turn of the chat template and the model's
    reply (up to its end token) is the answer: the way to query a fine-tuned model.
    """
    if chat:
        template = ChatTemplate()
        prompts = [
            template.encode_prompt([{"role": "user", "content": ex.context}], em.tokenizer) for ex in examples
        ]
        until = ()
    else:
        prompts = [ex.context for ex in examples]
    predictions = [greedy_until(em, prompt, until, max_new_tokens).strip() for prompt in prompts]
    references = [ex.answers for ex in examples]
    n = len(examples)
    return {
        "n": n,
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "f1": sum(f1_score(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": corpus_bleu(predictions, references),
        "predictions": predictions,
    }
