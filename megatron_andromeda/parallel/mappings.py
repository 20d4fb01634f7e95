"""Paired autograd collectives: each forward collective has its transpose as the backward.

| function                                  | forward                    | backward                  |
|-------------------------------------------|----------------------------|---------------------------|
| copy_to_tensor_parallel_region            | identity                   | all-reduce                |
| reduce_from_tensor_parallel_region        | all-reduce                 | identity                  |
| gather_from_tensor_parallel_region        | all-gather (last dim)      | keep own chunk            |
| scatter_to_sequence_parallel_region       | keep own sequence chunk    | all-gather (sequence)     |
| gather_from_sequence_parallel_region      | all-gather (sequence)      | reduce-scatter, or keep   |
| reduce_scatter_to_sequence_parallel_region| reduce-scatter (sequence)  | all-gather (sequence)     |

Every function takes its process group explicitly; `None` (the single-process context) or a group
of one process makes it the identity. Activations are batch-first, so the sequence dim is 1.

`count_comm()` tallies what each collective moves, for the communication benchmark: the payload
(the full logical tensor: the all-reduced buffer, the gathered output, the reduce-scattered input)
and the bytes a rank sends in a ring implementation (2(n-1)/n of the payload for an all-reduce,
(n-1)/n for an all-gather or reduce-scatter).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

SEQ_DIM = 1  # activations are (B, T, D)

Group = dist.ProcessGroup | None

# torch >= 2.13 names the single-tensor collectives *_single (the old names warn); older torch lacks them.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------------------------- counting
@dataclass
class CommCounter:
    calls: Counter = field(default_factory=Counter)
    payload_bytes: Counter = field(default_factory=Counter)
    wire_bytes: Counter = field(default_factory=Counter)

    def add(self, op: str, payload: int, ranks: int) -> None:
        ring = 2 * (ranks - 1) / ranks if op == "all_reduce" else (ranks - 1) / ranks
        self.calls[op] += 1
        self.payload_bytes[op] += payload
        self.wire_bytes[op] += int(payload * ring)

    @property
    def total_payload(self) -> int:
        return sum(self.payload_bytes.values())

    @property
    def total_wire(self) -> int:
        return sum(self.wire_bytes.values())


# Process-wide on purpose: backward collectives run on autograd's threads, where a context
# variable set by the caller is not visible. Empty unless a benchmark opts in with count_comm().
_ACTIVE_COUNTERS: list[CommCounter] = []


@contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Tally every collective issued (by any thread of this process) inside the block."""
    counter = CommCounter()
    _ACTIVE_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTERS.remove(counter)


def _record(op: str, tensor: torch.Tensor, ranks: int) -> None:
    for counter in _ACTIVE_COUNTERS:
        counter.add(op, tensor.numel() * tensor.element_size(), ranks)


# --------------------------------------------------------------------------------------------- primitives
def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(tensor: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (op "sum" or "max"), counted; a no-op for a group of one."""
    n = group_size(group)
    if n > 1:
        _record("all_reduce", tensor, n)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


def _all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    _record("all_gather", out, n)
    if dim == 0:
        return out
    return torch.cat(out.chunk(n, dim=0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: dim {dim} of shape {tuple(x.shape)} is not divisible by {n} ranks")
    stacked = torch.cat(x.chunk(n, dim=dim), dim=0) if dim != 0 else x.contiguous()
    out = torch.empty((stacked.shape[0] // n, *stacked.shape[1:]), dtype=x.dtype, device=x.device)
    _record("reduce_scatter", stacked, n)
    _reduce_scatter_single(out, stacked, group=group)
    return out


def _split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} of shape {tuple(x.shape)} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# --------------------------------------------------------------------------------------------- autograd pairs
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_is_partial):
        ctx.group, ctx.dim, ctx.partial = group, dim, grad_is_partial
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter(grad, ctx.group, ctx.dim), None, None, None
        return _split(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: its gradients are partial sums."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing the ranks' partial outputs."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate the ranks' last-dim shards (e.g. column-parallel outputs) on every rank."""
    return x if group_size(group) == 1 else _Gather.apply(x, group, -1, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's sequence chunk of a replicated (B, T, D) tensor."""
    return x if group_size(group) == 1 else _Scatter.apply(x, group, SEQ_DIM)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, grad_is_partial: bool = True
) -> torch.Tensor:
    """All-gather sequence shards (B, T/n, D) -> (B, T, D).

    grad_is_partial=True when the consumer is tensor-parallel (each rank's gradient is a partial
    sum, so the backward reduce-scatters); False when the consumer is replicated (the gradients
    already agree and the backward just keeps this rank's chunk).
    """
    return x if group_size(group) == 1 else _Gather.apply(x, group, SEQ_DIM, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum the ranks' partial (B, T, D) outputs and keep this rank's sequence chunk (B, T/n, D)."""
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, group, SEQ_DIM)
