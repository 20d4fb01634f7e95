"""ZeRO-1: fp32 master weights and Adam moments sharded over the data-parallel ranks.

One step on each rank (d = data-parallel degree):

1. backward accumulates fp32 gradients in the flat buffer; each bucket is reduce-scattered as soon
   as it is complete, leaving this rank the average of its 1/d slice of every bucket
   (data_parallel.GradBuffer with reduce_scatter=True);
2. the loop's norm, clipping and skip decision read only that slice; the norm sums the squares
   over every rank (grad_norm.py);
3. AdamW updates the slice's fp32 masters, which are rounded into this rank's slice of the model's
   flat parameter buffer;
4. every bucket is all-gathered in place, in the parameters' dtype, so each rank again holds the
   whole model.

Optimizer memory per rank is 12 N / d bytes for N half-precision parameters (fp32 master, m, v) and
8 N / d in fp32 runs, where the parameters are their own masters, against 12 N and 8 N replicated.
The traffic equals one all-reduce (a reduce-scatter plus an all-gather). A skipped step calls none
of this, so masters, moments and parameters stay exactly as they were.

The state dict has the layout documented in mixed_precision.py: one 1-D fragment per parameter with
its [shard_start, shard_stop); `merge_optimizer_states` joins the data ranks' dicts into whole
parameters, which `load_state_dict` can then slice for any other data-parallel degree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.config import OptimConfig
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.data_parallel import GradBuffer, flatten_parameters
from megatron_andromeda.parallel.mappings import Group
from megatron_andromeda.parallel.mixed_precision import MixedPrecisionOptimizer, world_group

_FRAGMENT_TENSORS = ("exp_avg", "exp_avg_sq", "master_param")


class DistributedOptimizer(MixedPrecisionOptimizer):
    """The mixed-precision AdamW holding only this data rank's shard of every bucket."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict[str, Any]],
        cfg: OptimConfig,
        grad_buffer: GradBuffer,
        ctx: ParallelContext,
    ):
        if not grad_buffer.reduce_scatter:
            raise ValueError("the distributed optimizer needs a GradBuffer built with reduce_scatter=True")
        # First, so that fp32 masters are views into the buffer the all-gather fills.
        self.flat_params = flatten_parameters(grad_buffer.layout)
        super().__init__(model, param_groups, cfg, grad_buffer, ctx)

    def shard_range(self, param: nn.Parameter) -> tuple[int, int]:
        """The elements of flattened `param` inside this rank's shard of its bucket (maybe none)."""
        start, stop = self.grad_buffer.valid_range(param)
        offset = self.grad_buffer.layout.ranges[param][0]
        return start - offset, stop - offset

    @property
    def norm_group(self) -> Group:
        """Each data rank holds a disjoint slice of the reduced gradient: sum the squares over all ranks."""
        return world_group(self.ctx)

    def _after_step(self) -> None:
        buffer = self.grad_buffer
        if buffer.dp_size == 1:
            return
        works = []
        for bucket in buffer.layout.buckets:
            start, stop = bucket.shard(buffer.dp_rank, buffer.dp_size)
            works.append(
                dist.all_gather_single(
                    self.flat_params[bucket.start : bucket.stop],
                    self.flat_params[start:stop],
                    group=buffer.group,
                    async_op=True,
                )
            )
        for work in works:
            work.wait()


def merge_optimizer_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state dict of whole (flattened) parameters from the data ranks' sharded state dicts.

    Pass the state dicts of all data ranks of one tensor/pipeline position, in any order. Each
    parameter's fragments must tile [0, numel) exactly; the result loads into a
    MixedPrecisionOptimizer or DistributedOptimizer of any data-parallel degree.
    """
    if not states:
        raise ValueError("merge_optimizer_states needs at least one state dict")
    pieces: dict[int, list[dict[str, Any]]] = {}
    for state in states:
        for index, entry in state["state"].items():
            pieces.setdefault(int(index), []).append(entry)
    merged = {}
    for group in states[0]["param_groups"]:
        for index, name in zip(group["params"], group.get("param_names", group["params"])):
            merged[index] = _merge_fragments(
                name, sorted(pieces.get(index, []), key=lambda e: e["shard_start"])
            )
    return {"state": merged, "param_groups": states[0]["param_groups"]}


def _merge_fragments(name: str, pieces: list[dict[str, Any]]) -> dict[str, Any]:
    covered, numel = 0, pieces[0]["numel"] if pieces else None
    for piece in pieces:
        if piece["shard_start"] != covered:
            break
        covered = piece["shard_stop"]
    if numel is None or covered != numel:
        raise ValueError(
            f"optimizer state of {name}: the fragments leave a gap or overlap at element {covered}; "
            "pass the state dicts of every data-parallel rank exactly once"
        )
    entry: dict[str, Any] = {"shard_start": 0, "shard_stop": numel, "numel": numel}
    for key in _FRAGMENT_TENSORS:
        if key in pieces[0]:
            entry[key] = torch.cat([p[key].reshape(-1) for p in pieces])
    if "step" in pieces[0]:
        entry["step"] = pieces[0]["step"]
    return entry
