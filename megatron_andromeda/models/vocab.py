"""Vocabulary padding: the model may have more output rows than the tokenizer has ids.

`model.vocab_size` is often rounded up from the tokenizer's size (to a multiple of tensor x 128, see
`parallel.layout.padded_vocab_size`) so that every tensor rank holds an even, GEMM-friendly shard.
The extra ids are never a target, so their logits are noise: training has to give them
probability zero, and so does everything else that reads logits (evaluation, sampling, export),
or the same weights score and sample differently depending on how much padding the layout needed.

The real vocabulary size has one owner: the tokenizer (`data.tokenizer.Tokenizer.vocab_size`).
Models do not record it; every consumer of logits is handed it by whoever loaded the tokenizer and
masks with `mask_padding_logits`. `resize_vocabulary` drops or adds padding rows of a state dict
(the Hugging Face export drops them, the import adds what a tensor layout needs).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_andromeda.errors import ConfigError
from megatron_andromeda.models.config import ModelConfig

# The state-dict entries with one row per vocabulary id (lm_head only when the head is not tied).
VOCAB_ROWS = ("embedding.weight", "lm_head.weight")


def mask_padding_logits(logits: torch.Tensor, real_vocab_size: int | None, first_id: int = 0) -> torch.Tensor:
    """`logits` (..., V) with the padding ids (>= real_vocab_size) at -inf: probability zero.

    `first_id` is the global id of the last dimension's first entry (a tensor rank's vocabulary
    shard starts at rank * V/tp). None means every id is real. The input is returned unchanged when
    it holds no padding, so the common unpadded case costs nothing.
    """
    if real_vocab_size is None or first_id + logits.shape[-1] <= real_vocab_size:
        return logits
    if real_vocab_size < 1:
        raise ValueError(f"real_vocab_size={real_vocab_size} must be >= 1")
    ids = torch.arange(first_id, first_id + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= real_vocab_size, float("-inf"))


def check_real_vocab_size(
    real_vocab_size: int, model_vocab_size: int, tokenizer: str = "the tokenizer"
) -> None:
    """A tokenizer with more ids than the model has rows is not this model's tokenizer."""
    if real_vocab_size > model_vocab_size:
        raise ConfigError(
            f"{tokenizer} has {real_vocab_size} ids but model.vocab_size={model_vocab_size}: "
            "is it the tokenizer this model was trained with?"
        )


def resize_vocabulary(
    cfg: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(cfg, state) with `vocab_size` vocabulary rows: extra rows are dropped, missing ones added as zeros.

    Only padding may be dropped: the caller passes at least the tokenizer's size. Added rows are
    zeros: their logits are masked wherever the model is used, and no input ever looks them up.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    out = dict(state)
    if vocab_size == cfg.vocab_size:
        return cfg, out
    for name in VOCAB_ROWS:
        if name not in out:
            continue
        rows = out[name]
        if rows.shape[0] != cfg.vocab_size:
            raise ValueError(f"{name} has {rows.shape[0]} rows but model.vocab_size={cfg.vocab_size}")
        if vocab_size <= rows.shape[0]:
            out[name] = rows[:vocab_size].clone()
        else:
            out[name] = torch.cat((rows, rows.new_zeros(vocab_size - rows.shape[0], *rows.shape[1:])))
    return dataclasses.replace(cfg, vocab_size=vocab_size), out
