"""The training loss of a layout, chosen in one place: plain, vocabulary-parallel, or a fused kernel.

    loss_fn = make_loss_fn(ctx, real_vocab_size=tokenizer.vocab_size, fused=None)
    total, parts = loss_fn(logits, labels, loss_mask, z_loss=...)

Every path produces per-token cross-entropy (and logsumexp^2 for PaLM's z-loss) and hands it to
`models.gpt.reduce_token_losses`, so the means, the z-loss and the per-sample totals are computed by
one function. Padding ids >= real_vocab_size never get probability mass, on every path:

| path                | when                          | logits                          |
|---------------------|-------------------------------|---------------------------------|
| vocabulary-parallel | parallel.tensor > 1           | (B, T, V/tp) per rank, never gathered |
| fused kernel        | `fused` given (flash-attn CE) | half precision, read in place (padding sliced off) |
| plain               | otherwise                     | (B, T, V), fp32 inside the loss  |
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from megatron_andromeda.models.gpt import language_model_loss, reduce_token_losses
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.tensor_parallel import vocab_parallel_cross_entropy

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (logits (N, V), labels (N,), z_loss) -> (per-token cross-entropy, per-token lse^2 or None)
TokenLosses = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor | None]]


def make_loss_fn(
    ctx: ParallelContext, real_vocab_size: int | None = None, fused: TokenLosses | None = None
) -> LossFn:
    """A function like `language_model_loss(logits, labels, loss_mask, z_loss)` for this layout.

    `fused` is a per-token kernel (`kernels.fused_cross_entropy()`); it serves unsharded logits
    only, so tensor-parallel runs use the vocabulary-parallel loss whatever is asked.
    """
    if ctx.tp_size > 1:
        return partial(_vocab_parallel_loss, group=ctx.tp_group, real_vocab_size=real_vocab_size)
    if fused is not None:
        return partial(_fused_loss, per_token=fused, real_vocab_size=real_vocab_size)
    return partial(language_model_loss, real_vocab_size=real_vocab_size)


def _vocab_parallel_loss(logits, labels, loss_mask=None, z_loss=0.0, *, group, real_vocab_size=None):
    # logits: (B, T, V/tp) on every tensor rank; the result is replicated across the group.
    ce, lse = vocab_parallel_cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), group, real_vocab_size
    )
    return reduce_token_losses(ce, loss_mask, labels.shape[0], lse.square(), z_loss)


def _fused_loss(logits, labels, loss_mask=None, z_loss=0.0, *, per_token, real_vocab_size=None):
    if real_vocab_size is not None and real_vocab_size < logits.shape[-1]:
        logits = logits[..., :real_vocab_size]  # the padding ids are not in the softmax
    flat = logits.reshape(-1, logits.shape[-1])
    ce, lse_squared = per_token(
        flat if flat.is_contiguous() else flat.contiguous(), labels.reshape(-1), z_loss
    )
    return reduce_token_losses(ce, loss_mask, labels.shape[0], lse_squared, z_loss)
