"""Evaluation of checkpoints: perplexity per source and split, zero-shot multiple choice, generation
tasks (exact match, F1, BLEU) and an lm-evaluation-harness adapter. Nothing here downloads data:
every task is a local JSONL file. Logits are read through `EvalModel.logits`, which gives the
vocabulary padding (model rows beyond the tokenizer's ids) probability zero, as training does."""

from megatron_andromeda.evaluation.scoring import EvalModel, continuation_logprobs, load_eval_model

__all__ = ["EvalModel", "continuation_logprobs", "load_eval_model"]
