"""Tensor-parallel layers, the vocabulary-parallel loss, and the gradient bookkeeping they need.

A transformer sub-block is a tensor-parallel region: column-parallel linears inside it compute some
output features from the whole input, row-parallel linears produce partial sums. The region is
entered and left by one collective each (`enter_region` / `leave_region`):

| activations outside the region    | enter (fwd / bwd)           | leave (fwd / bwd)            |
|-----------------------------------|-----------------------------|------------------------------|
| replicated (B, T, D)              | identity / all-reduce       | all-reduce / identity        |
| sequence shards (B, T/tp, D) (SP) | all-gather / reduce-scatter | reduce-scatter / all-gather  |

With sequence parallelism the norms, dropout and residual adds run on 1/tp of the tokens, for the
same bytes on the wire. The linears can do the entering/leaving themselves (`input_mode`,
`output_mode`); parallelize.py instead places it around whole sub-blocks so that the two branches of
a parallel block share one collective each way.

Parameter tags read by `sum_partial_grads` and `grad_norm_squared`:
- `tensor_parallel`: the parameter is a shard (its gradient is complete, counted once per rank);
- `sequence_parallel`: a replicated weight whose gradient on each rank is a partial sum (the name
  TE and Megatron give this tag): norms under sequence parallelism (each rank saw its tokens) and
  norms fused into a Transformer Engine LayerNormLinear (each rank's output feeds its own columns);
- `tp_replicated_rows`: rows of a shard that several ranks hold (KV heads when there are fewer
  than the tensor degree): each rank's gradient covers only its own query heads' use of them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda.models.vocab import mask_padding_logits
from megatron_andromeda.parallel.mappings import (
    Group,
    all_reduce_,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def tensor_parallel_parameter(weight: torch.Tensor) -> nn.Parameter:
    """A parameter holding this rank's shard (tagged so that norms and finalisation know)."""
    param = nn.Parameter(weight.detach().clone())
    param.tensor_parallel = True
    return param


def mark_partial_gradient(param: nn.Parameter) -> None:
    """Tag a replicated weight whose gradient each tensor rank holds only part of (summed over the
    tensor group after the backward, counted once in the global norm)."""
    param.sequence_parallel = True


def enter_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """(B, T, D) replicated, or (B, T/tp, D) under sequence parallelism -> (B, T, D) inside the region."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, group, grad_is_partial=True)
    return copy_to_tensor_parallel_region(x, group)


def leave_region(partial: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Sum the ranks' partial (B, T, D) outputs: replicated, or this rank's (B, T/tp, D) shard under SP."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(partial, group)
    return reduce_from_tensor_parallel_region(partial, group)


class ColumnParallelLinear(nn.Module):
    """y[..., local outputs] = x @ W_local^T, W's output rows split across the tensor group (no bias).

    input_mode: "replicated" (enter the region here), "sequence" (enter from sequence shards) or
    "in_region" (the caller already entered it). gather_output concatenates the ranks' outputs.
    """

    def __init__(
        self,
        weight_shard: torch.Tensor,
        group: Group,
        *,
        input_mode: str = "replicated",
        gather_output: bool = False,
    ):
        super().__init__()
        if input_mode not in ("replicated", "sequence", "in_region"):
            raise ValueError(f"input_mode={input_mode!r} is not one of replicated, sequence, in_region")
        self.weight = tensor_parallel_parameter(weight_shard)  # (out / tp, in)
        self.group = group
        self.input_mode = input_mode
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode != "in_region":
            x = enter_region(x, self.group, self.input_mode == "sequence")  # (B, T, D)
        y = F.linear(x, self.weight)  # (B, T, out / tp)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y

    @property
    def local_gemm(self) -> bool:
        """Whether forward is a plain GEMM on the shard (no collective): what a kernel may replace."""
        return self.input_mode == "in_region" and not self.gather_output

    def extra_repr(self) -> str:
        rows, cols = self.weight.shape
        return f"in={cols}, out_local={rows}, tp={group_size(self.group)}, input_mode={self.input_mode}"


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W_local^T, W's input columns split across the tensor group.

    output_mode: "replicated" (all-reduce), "sequence" (reduce-scatter to sequence shards) or
    "partial" (return this rank's partial sum; the caller leaves the region).
    """

    def __init__(self, weight_shard: torch.Tensor, group: Group, *, output_mode: str = "replicated"):
        super().__init__()
        if output_mode not in ("replicated", "sequence", "partial"):
            raise ValueError(f"output_mode={output_mode!r} is not one of replicated, sequence, partial")
        self.weight = tensor_parallel_parameter(weight_shard)  # (out, in / tp)
        self.group = group
        self.output_mode = output_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, out), partial
        if self.output_mode == "partial":
            return y
        return leave_region(y, self.group, self.output_mode == "sequence")

    @property
    def local_gemm(self) -> bool:
        """Whether forward is a plain GEMM on the shard (no collective): what a kernel may replace."""
        return self.output_mode == "partial"

    def extra_repr(self) -> str:
        rows, cols = self.weight.shape
        return f"in_local={cols}, out={rows}, tp={group_size(self.group)}, output_mode={self.output_mode}"


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of vocabulary rows; the lookups are summed across ranks.

    The output is replicated (B, T, D): it is also what the model reads the sequence length from.
    """

    def __init__(self, weight_shard: torch.Tensor, group: Group):
        super().__init__()
        self.weight = tensor_parallel_parameter(weight_shard)  # (V / tp, D)
        self.group = group
        self.vocab_start = group_rank(group) * weight_shard.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        rows, dim = self.weight.shape
        return f"vocab_local={rows}, vocab_start={self.vocab_start}, dim={dim}"


# --------------------------------------------------------------------------------------------- loss
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy and logsumexp from vocabulary-sharded logits; full logits never exist.

    Two all-reduces of (N,) vectors: the max, then [sum of exp, target logit] together.
    """

    @staticmethod
    def forward(ctx, logits, target, group, real_vocab_size):
        # logits: (N, V/tp) fp32, target: (N,) global ids
        n_local = logits.shape[-1]
        start = group_rank(group) * n_local
        logits = mask_padding_logits(logits, real_vocab_size, first_id=start)
        logits_max = all_reduce_(logits.max(dim=-1).values, group, op="max")  # (N,)
        shifted = logits - logits_max[:, None]
        local_target = target - start
        outside = (local_target < 0) | (local_target >= n_local)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(1, local_target[:, None]).squeeze(1).masked_fill(outside, 0.0)
        exp = shifted.exp_()  # reuses shifted's memory; becomes the softmax below
        sums = all_reduce_(torch.stack((exp.sum(dim=-1), target_logit)), group)  # (2, N)
        sum_exp, target_logit = sums[0], sums[1]
        softmax = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, local_target, outside)
        log_sum = sum_exp.log()
        return log_sum - target_logit, log_sum + logits_max  # cross-entropy, logsumexp

    @staticmethod
    def backward(ctx, grad_ce, grad_lse):
        softmax, local_target, outside = ctx.saved_tensors
        # d ce / d logits = softmax - onehot(target); d lse / d logits = softmax
        grad = softmax * (grad_ce + grad_lse)[:, None]
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= grad_ce * (~outside)
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Group, real_vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (cross-entropy, logsumexp), both (N,), from logits (N, V/tp) sharded over `group`.

    Vocabulary ids >= real_vocab_size (the padding of the embedding) get probability 0.
    """
    return _VocabParallelCrossEntropy.apply(logits.float(), target, group, real_vocab_size)


# --------------------------------------------------------------------------------------------- gradients
@dataclass(frozen=True)
class ReplicatedRows:
    """Rows [start, stop) of a shard copy KV chunk `slot` (of `num_slots`), held by `replicas` ranks."""

    start: int
    stop: int
    slot: int
    num_slots: int
    replicas: int


def sum_partial_grads(model: nn.Module, group: Group) -> None:
    """Sum the partial gradients of replicated weights over the tensor group (one all-reduce per dtype).

    Call after the last backward of a step and before clipping. Partial gradients come from norm
    weights under sequence parallelism (each rank saw a sequence shard) and from replicated KV rows
    (each rank's query heads used them). A replicated KV slot is summed by padding every rank's rows
    into a zero buffer of all slots: one all-reduce serves multi-query and grouped layouts alike.
    """
    if group_size(group) == 1:
        return
    buckets: dict[torch.dtype, list[tuple[nn.Parameter, torch.Tensor, ReplicatedRows | None]]] = defaultdict(
        list
    )
    for param in model.parameters():
        rows: ReplicatedRows | None = getattr(param, "tp_replicated_rows", None)
        if not param.requires_grad or not (rows or getattr(param, "sequence_parallel", False)):
            continue
        if param.grad is None:  # every rank must contribute the same buffers
            param.grad = torch.zeros_like(param)
        if rows is None:
            part = param.grad
        else:
            part = param.grad.new_zeros((rows.num_slots, rows.stop - rows.start, *param.shape[1:]))
            part[rows.slot] = param.grad[rows.start : rows.stop]
        buckets[part.dtype].append((param, part, rows))
    for entries in buckets.values():
        flat = all_reduce_(torch.cat([part.reshape(-1) for _, part, _ in entries]), group)
        offset = 0
        for param, part, rows in entries:
            summed = flat[offset : offset + part.numel()].view_as(part)
            offset += part.numel()
            if rows is None:
                param.grad.copy_(summed)
            else:
                param.grad[rows.start : rows.stop] = summed[rows.slot]


def grad_norm_squared(model: nn.Module, tp_rank: int) -> torch.Tensor:
    """This rank's share of the model's squared gradient norm, with every replicated value counted once.

    Summing it over the model-parallel group (tp x pp) gives the squared norm of the full model.
    Replicated tensors count on tensor rank 0 only; replicated KV rows on the first rank holding them.
    """
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for param in model.parameters():
        if param.grad is None:
            continue
        grad = param.grad.float()
        rows: ReplicatedRows | None = getattr(param, "tp_replicated_rows", None)
        if not getattr(param, "tensor_parallel", False):
            part = grad.square().sum() if tp_rank == 0 else None
        elif rows is not None and tp_rank % rows.replicas:
            part = grad[: rows.start].square().sum() + grad[rows.stop :].square().sum()
        else:
            part = grad.square().sum()
        if part is not None:
            total = total + part
    return total
