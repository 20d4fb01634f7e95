"""Data parallelism: fp32 main gradients in one flat buffer, reduced in buckets during the backward pass.

Every trainable parameter gets `param.main_grad`, an fp32 view into `GradBuffer.data`. A
post-accumulate-grad hook adds each micro-batch's gradient into it (so bf16/fp16 models still
accumulate in fp32) and frees `param.grad`. The hook also counts: when every parameter of a bucket
has received its gradient from the step's last micro-batch, the bucket's reduction starts
asynchronously while backward carries on with the earlier layers. Earlier micro-batches reduce
nothing.

Why our own instead of torch's DistributedDataParallel:
- DDP reduces `param.grad` in the parameters' dtype; we accumulate and reduce fp32 main gradients;
- the distributed optimizer needs a reduce-scatter (each rank keeps its shard); DDP only all-reduces;
- the pipeline schedule runs the backward passes itself, so a `no_sync()` context around the
  non-last micro-batches would have to live inside every schedule; counting gradients per
  parameter works with any schedule.

Layout: parameters in reverse registration order (about the order backward produces their
gradients), cut into buckets of about `bucket_numel` elements, each padded to a multiple of
64 x dp so that it splits into dp equal shards. Rank r's shard of a bucket is its r-th slice; the
distributed optimizer updates exactly those elements. Buckets are reduced strictly in order, so
every rank issues the same collectives in the same order. A parameter shared with another pipeline
stage (the tied embedding) gets a bucket of its own, so that its shard boundaries line up on both
stages.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.parallel.mappings import Group, all_reduce_, group_rank, group_size

DEFAULT_BUCKET_NUMEL = 2**24  # 64 MiB of fp32 gradients per bucket
PAD_ELEMENTS = 64  # each shard of a bucket is a multiple of this many elements


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True, eq=False)
class Bucket:
    """Elements [start, stop) of the flat buffers, holding `params`; (stop - start) divides by dp."""

    index: int
    start: int
    stop: int
    params: tuple[nn.Parameter, ...]

    def shard(self, rank: int, size: int) -> tuple[int, int]:
        """The [start, stop) of rank `rank`'s equal slice of this bucket."""
        width = (self.stop - self.start) // size
        return self.start + rank * width, self.start + (rank + 1) * width


class FlatLayout:
    """Where each parameter lives in the flat gradient (and parameter) buffers, and the buckets."""

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        dp_size: int,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        own_bucket: Collection[nn.Parameter] = (),
    ):
        if not named_params:
            raise ValueError("FlatLayout needs at least one trainable parameter")
        if bucket_numel <= 0:
            raise ValueError(f"bucket_numel={bucket_numel} must be positive")
        self.dp_size = dp_size
        self.names: dict[nn.Parameter, str] = {p: n for n, p in named_params}
        self.ranges: dict[nn.Parameter, tuple[int, int]] = {}
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[nn.Parameter, Bucket] = {}
        alone = set(own_bucket)
        offset, members = 0, []
        for _, param in named_params:
            if param in alone:
                offset, members = self._close(offset, members)
            self.ranges[param] = (offset, offset + param.numel())
            offset += param.numel()
            members.append(param)
            if param in alone or offset - self.ranges[members[0]][0] >= bucket_numel:
                offset, members = self._close(offset, members)
        self.numel, _ = self._close(offset, members)

    def _close(self, offset: int, members: list[nn.Parameter]) -> tuple[int, list]:
        if not members:
            return offset, members
        stop = _round_up(offset, PAD_ELEMENTS * self.dp_size)
        bucket = Bucket(len(self.buckets), self.ranges[members[0]][0], stop, tuple(members))
        self.buckets.append(bucket)
        for param in members:
            self.bucket_of[param] = bucket
        return stop, []

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.ranges)


class GradBuffer:
    """fp32 main gradients of the layout's parameters, reduced over the data-parallel `group`.

    With `reduce_scatter=False` every rank ends up with the whole averaged gradient (all-reduce);
    with `reduce_scatter=True` only its shard of each bucket is valid (`valid_range`). Gradients are
    averaged over the data-parallel ranks: each rank's loss is already a mean over its samples.
    """

    def __init__(
        self,
        layout: FlatLayout,
        group: Group,
        *,
        num_microbatches: int,
        reduce_scatter: bool = False,
        device: torch.device | str = "cpu",
    ):
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
        self.layout = layout
        self.group = group
        self.dp_size, self.dp_rank = group_size(group), group_rank(group)
        if layout.dp_size != self.dp_size:
            raise ValueError(
                f"layout built for {layout.dp_size} data-parallel ranks, group has {self.dp_size}"
            )
        self.num_microbatches = num_microbatches
        self.reduce_scatter = reduce_scatter
        self.data = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        self._hooks = []
        for param, (start, stop) in layout.ranges.items():
            param.main_grad = self.data[start:stop].view_as(param)
            self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))
        self._works: list[dist.Work] = []
        self._reset_counters()

    # ------------------------------------------------------------------------------------------ per step
    def _reset_counters(self) -> None:
        self._grads_seen = dict.fromkeys(self.layout.ranges, 0)
        self._missing = [len(b.params) for b in self.layout.buckets]  # params still awaiting their last grad
        self._next = 0  # the next bucket to reduce; buckets go strictly in order

    def zero_(self) -> None:
        """Start a new step: wait for any reduction still in flight, zero the gradients and counters."""
        self._wait()
        self.data.zero_()
        self._reset_counters()

    @property
    def num_reduced(self) -> int:
        """How many buckets have had their reduction started this step."""
        return self._next

    def _on_grad(self, param: nn.Parameter) -> None:
        bucket = self.layout.bucket_of[param]
        if bucket.index < self._next:
            raise RuntimeError(
                f"a gradient for {self.layout.names[param]} arrived after its bucket was reduced: call "
                "optimizer.zero_grad() before each step, and run the step's "
                f"{self.num_microbatches} backward passes before finish_gradients"
            )
        param.main_grad.add_(param.grad)  # fp32 += grad in the parameter's dtype
        param.grad = None
        self._grads_seen[param] += 1
        if self._grads_seen[param] == self.num_microbatches:
            self._missing[bucket.index] -= 1
            while self._next < len(self._missing) and self._missing[self._next] == 0:
                self._reduce(self.layout.buckets[self._next])

    def _reduce(self, bucket: Bucket) -> None:
        self._next = bucket.index + 1
        if self.dp_size == 1:
            return
        grads = self.data[bucket.start : bucket.stop]
        grads.div_(self.dp_size)
        if self.reduce_scatter:
            start, stop = bucket.shard(self.dp_rank, self.dp_size)
            work = dist.reduce_scatter_single(self.data[start:stop], grads, group=self.group, async_op=True)
        else:
            work = dist.all_reduce(grads, group=self.group, async_op=True)
        self._works.append(work)

    def finish(self) -> None:
        """Reduce the buckets not started yet (parameters with no gradient this step), then wait for all."""
        for bucket in self.layout.buckets[self._next :]:
            self._reduce(bucket)
        self._wait()

    def _wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []

    # ------------------------------------------------------------------------------------------ queries
    def valid_range(self, param: nn.Parameter) -> tuple[int, int]:
        """The buffer elements of `param` that hold its reduced gradient on this rank (may be empty)."""
        start, stop = self.layout.ranges[param]
        if not self.reduce_scatter:
            return start, stop
        lo, hi = self.layout.bucket_of[param].shard(self.dp_rank, self.dp_size)
        lo = max(start, lo)
        return lo, max(lo, min(stop, hi))


def flatten_parameters(layout: FlatLayout) -> torch.Tensor:
    """Move every parameter of `layout` into one flat tensor at its offset; returns the tensor.

    The distributed optimizer all-gathers updated shards straight into it. Call it after the model
    is on its device and in its final dtype: `.to()` would move the parameters out again.
    """
    params = layout.params
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"all trainable parameters must share one dtype to be flattened, found {dtypes}")
    flat = torch.zeros(layout.numel, dtype=params[0].dtype, device=params[0].device)
    for param, (start, stop) in layout.ranges.items():
        flat[start:stop].copy_(param.detach().reshape(-1))
        param.data = flat[start:stop].view_as(param)
    return flat


# --------------------------------------------------------------------------------------------- replicas
def finish_gradients(
    buffer: GradBuffer,
    tp_group: Group = None,
    shared_embedding: nn.Parameter | None = None,
    embedding_group: Group = None,
) -> None:
    """After the step's last backward: data-parallel reduction, then the sums over replicas.

    Tensor parallelism leaves partial gradients on replicated weights (norms under sequence
    parallelism, KV rows shared by several ranks); pipeline parallelism leaves the tied embedding's
    two halves (lookup on the first stage, output head on the last). Both are sums, so they commute
    with the data-parallel average and are done on the elements this rank holds after it.
    """
    buffer.finish()
    _sum_tensor_parallel_partials(buffer, tp_group)
    if shared_embedding is not None and group_size(embedding_group) > 1:
        start, stop = buffer.valid_range(shared_embedding)
        all_reduce_(buffer.data[start:stop], embedding_group)


def _sum_tensor_parallel_partials(buffer: GradBuffer, group: Group) -> None:
    """The buffer's valid gradient ranges (the same on every tensor rank: they share the data rank)."""

    def parts():
        for param in buffer.layout.params:
            start, stop = buffer.valid_range(param)
            yield param, buffer.data[start:stop], start - buffer.layout.ranges[param][0]

    sum_tensor_parallel_partials(parts(), group)


def sum_tensor_parallel_partials(
    parts: Iterable[tuple[nn.Parameter, torch.Tensor, int]], group: Group
) -> None:
    """Sum partial gradients of tensor-replicated values over `group` in one all-reduce, in place.

    `parts` are (parameter, gradient, start): the 1-D gradient of elements [start, start + len) of
    the flattened parameter, the same ranges on every rank of the group. Tags come from
    parallel/tensor_parallel.py. A replicated KV slot is summed by padding every rank's rows into a
    zero buffer of all slots (the same trick as `finalize_tp_grads`).
    """
    if group_size(group) == 1:
        return
    pending: list[tuple[torch.Tensor, int | None, torch.Tensor]] = []  # (target, slot, values to reduce)
    for param, grad, start in parts:
        rows = getattr(param, "tp_replicated_rows", None)
        if not (rows or getattr(param, "sequence_parallel", False)):
            continue
        lo, hi = 0, grad.numel()
        if rows is not None:
            row = math.prod(param.shape[1:])
            lo, hi = max(lo, rows.start * row - start), min(hi, rows.stop * row - start)
        if lo >= hi:
            continue
        own = grad[lo:hi]
        if rows is None:
            pending.append((own, None, own))
        else:
            padded = own.new_zeros((rows.num_slots, hi - lo))
            padded[rows.slot] = own
            pending.append((own, rows.slot, padded))
    if not pending:
        return
    flat = all_reduce_(torch.cat([values.reshape(-1) for *_, values in pending]), group)
    offset = 0
    for target, slot, values in pending:
        summed = flat[offset : offset + values.numel()].view_as(values)
        offset += values.numel()
        target.copy_(summed if slot is None else summed[slot])
