"""The parallel side of the training loop, built in one call: optimizer, gradient buffer, loop hooks.

    ctx = init_parallel(cfg)
    model = parallelize_model(build_model(cfg), ctx, cfg.parallel).to(ctx.device)
    parallel = build_parallel_training(ctx, model, cfg)
    trainer = Trainer(cfg, model, parallel.optimizer, ..., hooks=parallel.hooks)

`build_parallel_training` casts the parameters to the run's precision, lays their fp32 gradients out
in buckets (data_parallel.py), builds the replicated or the distributed optimizer
(`parallel.distributed_optimizer`) and, for fp16, the all-ranks loss scaler. The hooks tell the
trainer this rank's data slice and give it the cross-rank reductions: finishing gradients, the
global norm, loss means and the one all-reduced skip flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.config import ConfigError, RunConfig, TrainConfig
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.data_parallel import (
    DEFAULT_BUCKET_NUMEL,
    FlatLayout,
    GradBuffer,
    finish_gradients,
)
from megatron_andromeda.parallel.distributed_optimizer import DistributedOptimizer
from megatron_andromeda.parallel.grad_norm import shared_embedding
from megatron_andromeda.parallel.mappings import Group, all_reduce_
from megatron_andromeda.parallel.mixed_precision import (
    DynamicLossScaler,
    MixedPrecisionOptimizer,
    cast_parameters,
    precision_dtype,
    world_group,
)
from megatron_andromeda.training.trainer import ParallelHooks


@dataclass
class ParallelTraining:
    optimizer: MixedPrecisionOptimizer
    hooks: ParallelHooks
    loss_scaler: DynamicLossScaler | None  # fp16 only
    grad_buffer: GradBuffer


def micro_batches_per_step(train: TrainConfig, dp_size: int) -> int:
    """Backward passes per step on each rank (the trainer's accumulation steps)."""
    per_rank = train.micro_batch_size * dp_size
    if train.global_batch_size % per_rank:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size="
            f"{train.micro_batch_size} x data-parallel degree {dp_size}"
        )
    return train.global_batch_size // per_rank


def build_parallel_training(
    ctx: ParallelContext,
    model: nn.Module,
    run_cfg: RunConfig,
    *,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    schedule: Callable | None = None,
) -> ParallelTraining:
    """Everything parallel the trainer needs, for a model already sharded and on its device."""
    tc = run_cfg.train
    num_microbatches = micro_batches_per_step(tc, ctx.dp_size)
    cast_parameters(model, precision_dtype(tc.precision))
    shared = shared_embedding(model, ctx)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layout = FlatLayout(
        named[::-1], ctx.dp_size, bucket_numel, own_bucket=[shared] if shared is not None else []
    )
    sharded = run_cfg.parallel.distributed_optimizer
    device = named[0][1].device
    buffer = GradBuffer(
        layout, ctx.dp_group, num_microbatches=num_microbatches, reduce_scatter=sharded, device=device
    )
    optimizer_cls = DistributedOptimizer if sharded else MixedPrecisionOptimizer
    optimizer = optimizer_cls(model, run_cfg.optim, buffer, ctx)
    scaler = DynamicLossScaler(world_group(ctx), device=device) if tc.precision == "fp16" else None
    hooks = build_parallel_hooks(ctx, model, optimizer, schedule=schedule)
    return ParallelTraining(optimizer, hooks, scaler, buffer)


def build_parallel_hooks(
    ctx: ParallelContext,
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    *,
    schedule: Callable | None = None,
) -> ParallelHooks:
    """The trainer's ParallelHooks for this rank; `optimizer` owns the gradient buffer they finish."""
    if ctx.pp_size > 1 and schedule is None:
        raise ConfigError(
            "parallel.pipeline > 1 needs a pipeline schedule: pass schedule= (parallel/pipeline)"
        )
    shared = shared_embedding(model, ctx)
    world = world_group(ctx)

    def finish(_model: nn.Module) -> None:
        finish_gradients(optimizer.grad_buffer, ctx.tp_group, shared, ctx.embedding_group)

    return ParallelHooks(
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp_size,
        is_logging_rank=ctx.rank == 0,
        num_devices=ctx.world_size,
        schedule=schedule,
        finish_gradients=finish,
        loss_from_last_stage=partial(loss_from_last_stage, ctx=ctx),
        grad_norm=lambda grads: optimizer.grad_norm(),  # reads the reduced fp32 shards, not `grads`
        mean_across_data=partial(mean_across_group, group=ctx.dp_group),
        any_rank_true=partial(any_rank_true, group=world, device=optimizer.device),
        rng=ctx.rng,
    )


# --------------------------------------------------------------------------------------------- reductions
def any_rank_true(flag: bool, group: Group, device: torch.device | str = "cpu") -> bool:
    """True on every rank of `group` if `flag` is true on any: the one all-reduced skip decision."""
    return bool(all_reduce_(torch.tensor([float(flag)], device=device), group, op="max").item())


def mean_across_group(value: torch.Tensor, group: Group) -> torch.Tensor:
    """The mean of `value` over `group` (a new tensor; `value` is left alone)."""
    total = all_reduce_(value.detach().clone().float(), group)
    return total / (1 if group is None else dist.get_world_size(group))


def loss_from_last_stage(value: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The last pipeline stage's loss on every stage of this pipeline (identity without pipelining)."""
    if ctx.pp_size == 1:
        return value
    out = value.detach().clone().float()
    src = ctx.layout.rank_of(ctx.pp_size - 1, ctx.dp_rank, ctx.tp_rank)
    dist.broadcast(out, src=src, group=ctx.pp_group)
    return out
