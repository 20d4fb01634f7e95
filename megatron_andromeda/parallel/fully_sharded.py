"""Full sharding (`parallel.data_sharding=full`): parameters, gradients and AdamW state sharded over the
data group by PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

What ZeRO-1 (distributed_optimizer.py) leaves replicated, half-precision weights and the fp32
gradient buffer, is sharded too: a rank keeps 1/d of every parameter (fp32, the master itself), of
its gradient and of the Adam moments, 16 N / d bytes for N parameters, plus the gathered weights of
the blocks it is running. We use FSDP2 rather than our own:

- `shard_model` runs last in the builder (after tensor parallelism, kernels, recomputation and
  compile, where the plain precision cast would be): `fully_shard` on each transformer block, then
  on the model, whose own unit holds the embedding, the final norm and the head (one unit, so a tied
  head reads the gathered embedding). FSDP2 all-gathers a unit's weights before its forward (and,
  when it resharded them after the forward, again before its backward) and reduce-scatters its
  gradients as soon as its backward is done, once per micro-batch. With bf16/fp16 its
  `MixedPrecisionPolicy` gathers and computes in half precision and reduces in fp32 into the fp32
  sharded gradients, so the fp32 shards are the master weights and nothing is copied.
- Sharding is over the data dimension of a DeviceMesh (`ParallelContext.mesh`) built on our own
  process groups: (data) or, with `parallel.data_replicas` > 1, (data_replicate, data_shard), which is
  HSDP: shard within a group, all-reduce across the groups. Our tensor parallelism stays our own: a
  parameter FSDP2 sees is this tensor rank's plain local shard, and its DTensor is `Shard(0)` of that
  (rows [r0, r1) of the tensor-parallel shard, the last ranks' rows possibly fewer or none).
- `FullyShardedOptimizer` runs torch's AdamW over the local tensors of those DTensor shards (views
  of FSDP2's sharded storage, updated in place), described as the same fragments as ZeRO-1's: rows
  [r0, r1) are elements [r0 * row, r1 * row) of the flattened tensor-parallel shard. Checkpoints,
  resharding, the gradient norm and the loss scaler therefore work unchanged.
- `finish_sharded_gradients` does after FSDP2's reductions what the gradient buffer's
  `finish_gradients` does: sum the partial gradients of tensor-replicated values (sequence-parallel
  norms, KV rows shared under multi-query attention) over the tensor group and the tied embedding's
  two halves over the embedding group, on the shard each rank holds (the same rows on every peer).

The global gradient norm sums every rank's counted squares over the world; under HSDP the replicas
hold equal shards, so only the first replica counts. A skipped step (non-finite norm) calls nothing
here: parameters and moments stay bit for bit.

Pipeline parallelism: each stage (each chunk of the interleaved schedule) is sharded on its own,
over the data group of its pipeline rank, and every schedule runs with it. FSDP2 then gathers per
micro-batch, which `parallel.reshard_after_forward=false` halves at the cost of keeping a stage's
gathered weights from each forward to its backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from megatron_andromeda.config import OptimConfig
from megatron_andromeda.parallel.context import ParallelContext, run_layout_of
from megatron_andromeda.parallel.data_parallel import sum_tensor_parallel_partials
from megatron_andromeda.parallel.grad_norm import counted_ranges, stage_models
from megatron_andromeda.parallel.mappings import Group, all_reduce_, group_size
from megatron_andromeda.parallel.mixed_precision import Fragment, MixedPrecisionOptimizer, world_group


# --------------------------------------------------------------------------------------------- the model
def shard_model(model: nn.Module, ctx: ParallelContext, dtype: torch.dtype) -> nn.Module:
    """Apply FSDP2 to `model` (a GPTModel or pipeline stage, already on its device) in place.

    Each block is a unit, then the model itself (embedding, final norm, head). Parameters become
    fp32 DTensor shards over `ctx.data_mesh`; `dtype` is what they are gathered in and compute with.
    The tensor-parallel tags of parameters (grad_norm.py's table) are carried over to the shards.
    """
    layout = run_layout_of(ctx)
    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32
    )
    tags = {name: dict(vars(p)) for name, p in model.named_parameters() if vars(p)}
    with torch.no_grad():  # start from the weights the plain cast gives: every mode trains the same run
        for param in model.parameters():
            param.copy_(param.to(dtype))
    options = dict(mesh=ctx.data_mesh, mp_policy=policy, reshard_after_forward=layout.reshard_after_forward)
    for chunk in stage_models(model):
        for block in chunk.layers.values():
            fully_shard(block, **options)
        fully_shard(chunk, **options)
    for name, param in model.named_parameters():
        for key, value in tags.get(name, {}).items():
            setattr(param, key, value)
    return model


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor)


def local_shard(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's values of `param`, flattened, a view; the index of the first in the flattened param).

    A plain parameter is all of itself at 0. An FSDP2 shard (a DTensor `Shard(0)` over the data
    mesh, replicated over an HSDP replica dimension) holds rows [r0, r1) of the tensor-parallel
    shard, chunks of ceil(rows / shards) rows as torch.chunk cuts them: the values start at r0 * row.
    """
    if not isinstance(param, DTensor):
        return param.detach().view(-1), 0
    dims = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    if len(dims) != 1 or param.placements[dims[0]] != Shard(0):
        raise ValueError(f"expected a Shard(0) parameter from fully_shard, got placements {param.placements}")
    mesh, dim = param.device_mesh, dims[0]
    rows, shards, shard_rank = param.shape[0], mesh.size(dim), mesh.get_local_rank(dim)
    per_rank = math.ceil(rows / shards)
    first = min(shard_rank * per_rank, rows)
    local = param.to_local().detach()
    if local.shape[0] != min(per_rank, rows - first):
        raise ValueError(
            f"shard of {tuple(param.shape)} on rank {shard_rank} of {shards}: {tuple(local.shape)}"
        )
    return local.view(-1), first * row_numel(param)


def row_numel(param: torch.Tensor) -> int:
    return math.prod(param.shape[1:])


# --------------------------------------------------------------------------------------------- optimizer
class FullyShardedOptimizer(MixedPrecisionOptimizer):
    """AdamW over this rank's FSDP2 shards: fp32 fragments that are the parameters' own storage.

    The state dict, loading, norm and step are MixedPrecisionOptimizer's (mixed_precision.py
    documents the fragment layout); the gradients are FSDP2's reduced shards, linked to the
    fragments by `link_gradients` after each step's backward passes.
    """

    def __init__(
        self, model: nn.Module, param_groups: list[dict[str, Any]], cfg: OptimConfig, ctx: ParallelContext
    ):
        layout = run_layout_of(ctx)
        self.grad_buffer = None
        self.ctx = ctx
        self.device = next(p.device for group in param_groups for p in group["params"])
        self.first_replica = layout.data_coords(ctx.rank)[0] == 0
        self.params = [p for group in param_groups for p in group["params"]]
        self._build(model, param_groups, cfg)

    def _fragment(self, name: str, index: int, param: nn.Parameter, is_copy: bool) -> Fragment | None:
        if not is_sharded(param) or param.dtype != torch.float32:
            raise ValueError(
                f"parameter {name} is not an fp32 FSDP2 shard: build the model with builder.build_model"
            )
        flat, start = local_shard(param)
        if flat.numel() == 0:
            return None
        stop = start + flat.numel()
        counted = counted_ranges(param, start, stop, self.ctx.tp_rank, is_copy or not self.first_replica)
        return Fragment(name, index, param, start, stop, flat, counted)

    @property
    def norm_group(self) -> Group:
        """Every data shard holds different values: sum the squares over all ranks."""
        return world_group(self.ctx)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients: FSDP2 creates fresh sharded ones in the next backward."""
        for param in self.params:
            param.grad = None
        for f in self.fragments:
            f.master.grad = None

    @torch.no_grad()
    def link_gradients(self) -> None:
        """Point each fragment's .grad at its parameter's reduced gradient shard (zeros if it got none)."""
        for f in self.fragments:
            grad = f.param.grad
            f.master.grad = torch.zeros_like(f.master) if grad is None else grad.to_local().view(-1)

    def fragment_of(self, param: nn.Parameter) -> Fragment | None:
        return next((f for f in self.fragments if f.param is param), None)


def finish_sharded_gradients(
    optimizer: FullyShardedOptimizer,
    tp_group: Group = None,
    shared_embedding: nn.Parameter | None = None,
    embedding_group: Group = None,
) -> None:
    """After the step's last backward (FSDP2 has reduced every shard): the sums over replicas.

    The same sums as data_parallel.finish_gradients, on the shard this rank holds: tensor peers hold
    the same rows of their (equally shaped) tensor-parallel shards, and the two holders of the tied
    embedding the same rows of it.
    """
    optimizer.link_gradients()
    sum_tensor_parallel_partials(((f.param, f.master.grad, f.start) for f in optimizer.fragments), tp_group)
    if shared_embedding is not None and group_size(embedding_group) > 1:
        fragment = optimizer.fragment_of(shared_embedding)
        if fragment is not None:
            all_reduce_(fragment.master.grad, embedding_group)
