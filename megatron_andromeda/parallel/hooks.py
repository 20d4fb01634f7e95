"""The loop's contract with the parallel world (`ParallelHooks`), and the parallel side built in one call.

    ctx = init_parallel(cfg, layout)
    model = builder.build_model(cfg, ctx, kernels)
    parallel = build_parallel_training(ctx, model, cfg, parameter_groups(model, cfg.optim))
    trainer = Trainer(cfg, model, parallel.optimizer, ..., hooks=parallel.hooks)

`ParallelHooks` is what the trainer is given: this rank's place in the layout (its data slice, the
accumulation steps), the pipeline schedule, how gradients are finished (tensor and data
reductions), the global gradient norm and the cross-rank averages. Its defaults are those of one
process, so the trainer needs nothing else. It lives here, not in training/, because parallel/
builds it and must not import the loop.

`build_parallel_training` lays the parameters' fp32 gradients out in buckets (data_parallel.py),
builds the replicated or the distributed optimizer (the run layout's `data_sharding`: none or
optimizer) over fp32 master weights and, for fp16, the all-ranks loss scaler. The parameters must
already have the run's precision (the builder casts them last). Under full sharding FSDP2 holds the
gradients and the optimizer is fully_sharded.FullyShardedOptimizer over the fp32 shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.config import RunConfig
from megatron_andromeda.errors import ConfigError
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.data_parallel import (
    DEFAULT_BUCKET_NUMEL,
    FlatLayout,
    GradBuffer,
    finish_gradients,
)
from megatron_andromeda.parallel.distributed_optimizer import DistributedOptimizer
from megatron_andromeda.parallel.fully_sharded import FullyShardedOptimizer, finish_sharded_gradients
from megatron_andromeda.parallel.grad_norm import shared_embedding
from megatron_andromeda.parallel.layout import RankLayout, RunLayout
from megatron_andromeda.parallel.mappings import Group, all_reduce_
from megatron_andromeda.parallel.mixed_precision import (
    DynamicLossScaler,
    MixedPrecisionOptimizer,
    precision_dtype,
    world_group,
)
from megatron_andromeda.parallel.watchdog import Watchdog

Parts = dict[str, torch.Tensor]


def no_pipelining(
    forward_step, data_iterator, model: nn.Module, num_microbatches: int, forward_only: bool = False
) -> list[Parts]:
    """The schedule of a model that is not split into stages: forward and backward each micro-batch."""
    parts = []
    for _ in range(num_microbatches):
        output, loss_fn = forward_step(data_iterator, model)
        loss, loss_parts = loss_fn(output)
        if not forward_only:
            loss.backward()
        parts.append(loss_parts)
    return parts


@dataclass
class ParallelHooks:
    """How the loop cooperates with other ranks; the defaults are those of a single process.

    `layout` is the run's validated layout (None: one process, derived by the trainer from its config).
    """

    layout: RunLayout | None = None
    rank: int = 0
    schedule: Callable[..., list[Parts]] = no_pipelining
    finish_gradients: Callable[[nn.Module], None] = lambda model: None
    loss_from_last_stage: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    grad_norm: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
    mean_across_data: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    any_rank_true: Callable[[bool], bool] = lambda flag: flag
    loss_scaler: Any = None  # fp16 across ranks: parallel.mixed_precision.DynamicLossScaler
    rng: Any = None  # parallel.random.RNGTracker: its states are saved in and restored from checkpoints
    begin_step: Callable[[int], None] = lambda step: None  # told the step number before its first work

    def _ranks(self) -> RankLayout:
        return self.layout if self.layout is not None else RankLayout(1, 1, 1)

    @property
    def dp_rank(self) -> int:
        return self._ranks().coords(self.rank)[1]

    @property
    def dp_size(self) -> int:
        return self._ranks().dp

    @property
    def num_devices(self) -> int:
        return self._ranks().world_size

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


@dataclass
class ParallelTraining:
    optimizer: MixedPrecisionOptimizer
    hooks: ParallelHooks
    loss_scaler: DynamicLossScaler | None  # fp16 only
    grad_buffer: GradBuffer | None  # None under full sharding (FSDP2 holds the gradient shards)


def run_layout(ctx: ParallelContext) -> RunLayout:
    """The context's run layout; a context built by hand around a bare RankLayout is refused."""
    if not isinstance(ctx.layout, RunLayout):
        raise ValueError(
            "this needs the run's layout: build the context with init_parallel(cfg) or "
            "ParallelContext.build(plan_layout(cfg, world_size)) / ParallelContext.single(layout=...)"
        )
    return ctx.layout


def build_parallel_training(
    ctx: ParallelContext,
    model: nn.Module,
    run_cfg: RunConfig,
    param_groups: list[dict[str, Any]],
    *,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    schedule: Callable | None = None,
    watchdog: Watchdog | None = None,
) -> ParallelTraining:
    """Everything parallel the trainer needs, for a model already built for this rank.

    `param_groups` are torch-style groups of the model's trainable parameters (weight decay per
    group); the caller decides them (training.optim.parameter_groups). `watchdog` guards the step's
    collectives (parallel/watchdog.py): a rank that stalls is named instead of a raw backend timeout.
    """
    layout = run_layout(ctx)
    tc = run_cfg.train
    if layout.fully_sharded:  # FSDP2 holds the gradients: no buffer
        optimizer = FullyShardedOptimizer(model, param_groups, run_cfg.optim, ctx)
        scaler = (
            DynamicLossScaler(world_group(ctx), device=optimizer.device) if tc.precision == "fp16" else None
        )
        hooks = build_parallel_hooks(ctx, model, optimizer, schedule=schedule)
        hooks.loss_scaler = scaler
        return ParallelTraining(optimizer, hooks, scaler, None)
    _check_precision(model, precision_dtype(tc.precision))
    shared = shared_embedding(model, ctx)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = FlatLayout(
        named[::-1], ctx.dp_size, bucket_numel, own_bucket=[shared] if shared is not None else []
    )
    sharded = layout.distributed_optimizer
    device = named[0][1].device
    buffer = GradBuffer(
        flat, ctx.dp_group, num_microbatches=layout.num_microbatches, reduce_scatter=sharded, device=device
    )
    optimizer_cls = DistributedOptimizer if sharded else MixedPrecisionOptimizer
    optimizer = optimizer_cls(model, param_groups, run_cfg.optim, buffer, ctx)
    scaler = DynamicLossScaler(world_group(ctx), device=device) if tc.precision == "fp16" else None
    hooks = build_parallel_hooks(ctx, model, optimizer, schedule=schedule, watchdog=watchdog)
    hooks.loss_scaler = scaler
    return ParallelTraining(optimizer, hooks, scaler, buffer)


def _check_precision(model: nn.Module, dtype: torch.dtype) -> None:
    wrong = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype != dtype]
    if wrong:
        name, got = wrong[0]
        raise ValueError(
            f"parameter {name} is {got} but the run trains in {dtype}: build the model with "
            "megatron_andromeda.builder.build_model (it casts the parameters last)"
        )


def build_parallel_hooks(
    ctx: ParallelContext,
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    *,
    schedule: Callable | None = None,
    watchdog: Watchdog | None = None,
) -> ParallelHooks:
    """The trainer's ParallelHooks for this rank; `optimizer` owns the gradient buffer they finish."""
    layout = run_layout(ctx)
    if ctx.pp_size > 1 and schedule is None:
        raise ConfigError(
            "parallel.pipeline > 1 needs a pipeline schedule: pass schedule= (parallel/pipeline)"
        )
    shared = shared_embedding(model, ctx)
    world = world_group(ctx)

    def finish(_model: nn.Module) -> None:
        if isinstance(optimizer, FullyShardedOptimizer):
            finish_sharded_gradients(optimizer, ctx.tp_group, shared, ctx.embedding_group)
        else:
            finish_gradients(optimizer.grad_buffer, ctx.tp_group, shared, ctx.embedding_group)

    guard = _StepWaits(watchdog)
    return ParallelHooks(
        layout=layout,
        rank=ctx.rank,
        schedule=schedule or no_pipelining,
        finish_gradients=guard("gradient reduction", finish, announce=True),
        loss_from_last_stage=guard("loss from the last stage", partial(loss_from_last_stage, ctx=ctx)),
        grad_norm=guard("gradient norm", lambda grads: optimizer.grad_norm()),  # the reduced fp32 shards
        mean_across_data=guard("data-parallel mean", partial(mean_across_group, group=ctx.dp_group)),
        any_rank_true=guard(
            "skip decision", partial(any_rank_true, group=world, device=optimizer.device), announce=True
        ),
        rng=ctx.rng,
        begin_step=guard.begin_step,
    )


class _StepWaits:
    """Wraps the step's collectives in `watchdog.watch`, labelled with the step (no-op without one)."""

    def __init__(self, watchdog: Watchdog | None):
        self.watchdog, self.step = watchdog, 0

    def begin_step(self, step: int) -> None:
        self.step = step

    def __call__(self, what: str, fn: Callable, announce: bool = False) -> Callable:
        if self.watchdog is None:
            return fn

        def guarded(*args, **kwargs):
            with self.watchdog.watch(f"step {self.step}: {what}", announce=announce):
                return fn(*args, **kwargs)

        return guarded


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
