"""The global gradient norm across tensor, pipeline and data groups, with every value counted once.

A rank holds three kinds of gradient values: its own tensor-parallel shards (counted), copies of
values other ranks hold too (counted by exactly one holder), and, under the distributed optimizer
or full sharding, only its data-parallel shard of the reduced gradient (disjoint across data ranks,
so the squares are summed over the data group as well; under HSDP only the first replica counts
its shard). Who counts a replicated value:

| value                                                  | counted on                              |
|--------------------------------------------------------|-----------------------------------------|
| a tensor-parallel shard (`param.tensor_parallel`)      | every rank (each holds different rows)  |
| a replicated weight: norms, anything when tp == 1      | tensor rank 0                           |
| KV rows shared by `replicas` ranks (`tp_replicated_rows`) | the first rank of each sharing group |
| the tied embedding, held on the first and last stage   | the first stage (the last stage's head is a copy) |

The tags are set by parallel/tensor_parallel.py and parallel/parallelize.py. Ranges are element
ranges of the flattened parameter, so they apply to any data-parallel fragment of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.mappings import Group, all_reduce_


def stage_models(model: nn.Module) -> list[GPTModel]:
    """The GPTModel chunks inside `model` (the model itself, or the chunks of an interleaved stage)."""
    return [m for m in model.modules() if isinstance(m, GPTModel)]


def shared_embedding(model: nn.Module, ctx: ParallelContext) -> nn.Parameter | None:
    """The tied embedding (first stage) or its output-head copy (last stage) when pp > 1, else None."""
    if ctx.pp_size == 1:
        return None
    for chunk in stage_models(model):
        if not chunk.cfg.tie_embeddings:
            continue
        # Frozen (a stage's freeze: both copies alike, train.freeze_parameters): no gradient to sum.
        if chunk.pre_process and chunk.embedding is not None:
            return chunk.embedding.weight if chunk.embedding.weight.requires_grad else None
        if chunk.post_process and chunk.lm_head is not None:
            return chunk.lm_head.weight if chunk.lm_head.weight.requires_grad else None
    return None


def pipeline_copies(model: nn.Module, ctx: ParallelContext) -> set[nn.Parameter]:
    """Parameters that are a copy of another stage's: the last stage's head under tied embeddings."""
    shared = shared_embedding(model, ctx)
    is_head = any(
        chunk.lm_head is not None and chunk.lm_head.weight is shared for chunk in stage_models(model)
    )
    return {shared} if shared is not None and is_head else set()


def counted_ranges(
    param: nn.Parameter, start: int, stop: int, tp_rank: int, is_copy: bool = False
) -> list[tuple[int, int]]:
    """Sub-ranges of elements [start, stop) of flattened `param` that this rank counts, relative to start."""
    if is_copy or start >= stop:
        return []
    if not getattr(param, "tensor_parallel", False):
        return [(0, stop - start)] if tp_rank == 0 else []
    rows = getattr(param, "tp_replicated_rows", None)
    if rows is None or tp_rank % rows.replicas == 0:
        return [(0, stop - start)]
    row = math.prod(param.shape[1:])  # (a DTensor shard's shape is the whole tensor-parallel shard's)
    skip_start, skip_stop = rows.start * row, rows.stop * row
    kept = [(start, min(stop, skip_start)), (max(start, skip_stop), stop)]
    return [(a - start, b - start) for a, b in kept if a < b]


def global_grad_norm(
    parts: Iterable[tuple[torch.Tensor, Sequence[tuple[int, int]]]], group: Group, device: torch.device
) -> torch.Tensor:
    """sqrt of the sum over `group` of every rank's counted squares.

    `parts` pairs a 1-D fp32 gradient with the ranges of it this rank counts. `group` is the
    model-parallel group when every data rank holds the whole reduced gradient, and the world when
    each holds a disjoint shard. A NaN or Inf anywhere makes the result non-finite on every rank,
    which is what lets all of them skip the step together.
    """
    total = torch.zeros(1, device=device)
    for grad, kept in parts:
        for a, b in kept:
            total += torch.dot(grad[a:b], grad[a:b])
    return all_reduce_(total, group).reshape(()).sqrt()
