"""The one place that applies tensor and sequence parallelism to an unmodified GPTModel.

Every rank builds the same full model (same seed), then `parallelize_model` changes it in place:

- each block's qkv / gate_up / up projections become ColumnParallelLinear and o_proj / down_proj
  RowParallelLinear, holding this rank's shard (parallel/sharding.py); the attention's head counts
  become per-rank (query heads split; KV heads split, or replicated when fewer than the degree);
- the embedding becomes a VocabParallelEmbedding and an untied head keeps its vocabulary shard; the
  head (tied or not) is then column-parallel and logits come out vocabulary-sharded, (B, T, V/tp);
- ALiBi slopes keep this rank's heads; the attention core (and, under sequence parallelism, the
  residual dropout) draws from the tensor-parallel random stream.

Where the regions are entered and left (forward hooks; the model code is not touched): every norm's
output enters one (it feeds attention, the MLP or the head), and every residual branch leaves it at
the input of the block's `dropout`, which both block types apply to each branch before the residual
add. A parallel block therefore sums its attention and MLP partials and pays one collective each
way per layer instead of two. Parameter names do not change, so checkpoints see the same keys.

Sequence parallelism splits the sequence from the first layer to the final norm: the embedding
output is the full sequence, and the first layer keeps this rank's chunk of it. Pipeline stages
exchange the chunks as they are (each tensor rank talks to the same tensor rank of the next stage),
tp times fewer bytes than the full activation; a later stage is told that its input holds 1/tp of
the sequence (`GPTModel.input_sequence_shards`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from megatron_andromeda.config import ParallelConfig
from megatron_andromeda.errors import ConfigError
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.layout import check_tensor_parallel
from megatron_andromeda.parallel.mappings import (
    all_reduce_,
    scatter_to_sequence_parallel_region,
)
from megatron_andromeda.parallel.random import RNGTracker
from megatron_andromeda.parallel.sharding import (
    kv_heads_per_rank,
    kv_replicas,
    shard_param,
    shard_qkv_layout,
    split_kind,
)
from megatron_andromeda.parallel.tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedRows,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_region,
    grad_norm_squared,
    leave_region,
    mark_partial_gradient,
    sum_partial_grads,
    tensor_parallel_parameter,
)


def parallelize_model(model: GPTModel, ctx: ParallelContext, parallel_cfg: ParallelConfig) -> GPTModel:
    """Shard `model` (built identically on every rank) over ctx's tensor group, in place; returns it."""
    if ctx.tp_size == 1:
        return model
    check_tensor_parallel(model.cfg, ctx.tp_size)
    if any(isinstance(m, ColumnParallelLinear) for m in model.modules()):
        raise ValueError("parallelize_model: this model is already tensor-parallel")
    sp = parallel_cfg.sequence_parallel
    for idx, block in model.layers.items():
        _parallelize_block(block, f"layers.{idx}", model, ctx, sp)
    _parallelize_ends(model, ctx)
    _enter_regions_after_norms(model, ctx, sp)
    if sp:
        _split_sequence_inside_stage(model, ctx)
        for name, param in model.named_parameters():
            if split_kind(name) == "replicated":  # norms applied to sequence shards: partial gradients
                mark_partial_gradient(param)
    if model.rotary is None:  # ALiBi: this rank's heads only
        heads = model.cfg.num_heads // ctx.tp_size
        model.alibi_slopes = model.alibi_slopes[ctx.tp_rank * heads : (ctx.tp_rank + 1) * heads].clone()
    return model


def _shard(model: GPTModel, ctx: ParallelContext, name: str, weight: torch.Tensor) -> torch.Tensor:
    return shard_param(name, weight.detach(), model.cfg, ctx.tp_rank, ctx.tp_size)


def _parallelize_block(
    block: nn.Module, prefix: str, model: GPTModel, ctx: ParallelContext, sp: bool
) -> None:
    cfg, group, tp = model.cfg, ctx.tp_group, ctx.tp_size
    shard = partial(_shard, model, ctx)
    attn, mlp = block.attn, block.mlp
    qkv = shard(f"{prefix}.attn.qkv_proj.weight", attn.qkv_proj.weight)
    attn.qkv_proj = ColumnParallelLinear(qkv, group, input_mode="in_region")
    attn.o_proj = RowParallelLinear(
        shard(f"{prefix}.attn.o_proj.weight", attn.o_proj.weight), group, output_mode="partial"
    )
    attn.num_heads = cfg.num_heads // tp
    attn.num_kv_heads = kv_heads_per_rank(cfg, tp)
    reps = kv_replicas(cfg, tp)
    if reps > 1:  # the shard is [q; k; v]: its k and v rows are copies held by `reps` ranks
        layout = shard_qkv_layout(cfg, tp)
        attn.qkv_proj.weight.tp_replicated_rows = ReplicatedRows(
            start=layout.q_rows,
            stop=layout.rows,
            slot=ctx.tp_rank // reps,
            num_slots=tp // reps,
            replicas=reps,
        )
    up_name = "gate_up_proj" if mlp.swiglu else "up_proj"
    up = shard(f"{prefix}.mlp.{up_name}.weight", getattr(mlp, up_name).weight)
    setattr(mlp, up_name, ColumnParallelLinear(up, group, input_mode="in_region"))
    down = shard(f"{prefix}.mlp.down_proj.weight", mlp.down_proj.weight)
    mlp.down_proj = RowParallelLinear(down, group, output_mode="partial")
    # Leave the region where the residual branch(es) reach the block's dropout: a parallel block sums
    # its attention and MLP partials first, so both branches share one collective.
    block.dropout.register_forward_pre_hook(lambda m, args: (leave_region(args[0], group, sp),))
    if cfg.dropout > 0:
        _run_in_tensor_parallel_stream(attn.core, ctx.rng)
        if sp:  # residual dropout acts on sequence shards: independent masks per rank
            _run_in_tensor_parallel_stream(block.dropout, ctx.rng)


def _parallelize_ends(model: GPTModel, ctx: ParallelContext) -> None:
    group = ctx.tp_group
    if model.embedding is not None:
        model.embedding = VocabParallelEmbedding(
            _shard(model, ctx, "embedding.weight", model.embedding.weight), group
        )
    if model.lm_head is not None:
        model.lm_head.weight = tensor_parallel_parameter(
            _shard(model, ctx, "lm_head.weight", model.lm_head.weight)
        )


def _enter_regions_after_norms(model: GPTModel, ctx: ParallelContext, sp: bool) -> None:
    """Every norm's output feeds a region: a block's attention/MLP, or the (column-parallel) head.

    The head is applied as F.linear(h, output_weight) inside GPTModel, so the final norm's output is
    the only place to enter its region; doing the same for the blocks' norms makes a parallel block's
    two branches share one collective.
    """
    group = ctx.tp_group
    norms = [
        m for name, m in model.named_modules() if re.fullmatch(r"(norm\d?|final_norm)", name.split(".")[-1])
    ]
    for norm in norms:
        norm.register_forward_hook(lambda m, args, out: enter_region(out, group, sp))


def _split_sequence_inside_stage(model: GPTModel, ctx: ParallelContext) -> None:
    layers = list(model.layers.values())
    if not layers:
        raise ConfigError("parallel.sequence_parallel needs at least one layer on every pipeline stage")
    group, tp = ctx.tp_group, ctx.tp_size

    def split(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, T, D), replicated
        if x.shape[1] % tp:
            raise ValueError(
                f"sequence parallelism needs the sequence length ({x.shape[1]}) to be a multiple of "
                f"parallel.tensor={tp}; pad the batch, or disable parallel.sequence_parallel (e.g. to decode)"
            )
        return (scatter_to_sequence_parallel_region(x, group), *args[1:])

    if model.pre_process:
        layers[0].register_forward_pre_hook(split)
    else:  # the previous stage sends its sequence chunk
        model.input_sequence_shards = tp


def _run_in_tensor_parallel_stream(module: nn.Module, rng: RNGTracker) -> None:
    """Draw the module's randomness from the tensor-parallel stream (a hook pair: no wrapper module)."""
    active: list = []

    def enter(mod: nn.Module, args: tuple) -> None:
        device = next((a.device for a in args if torch.is_tensor(a)), torch.device("cpu"))
        fork = rng.fork("tensor-parallel", device)
        fork.__enter__()
        active.append(fork)

    def leave(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


# --------------------------------------------------------------------------------------------- grads
def finalize_tp_grads(model: nn.Module, ctx: ParallelContext) -> None:
    """After the step's last backward: sum replicated weights' partial gradients over the tensor group."""
    sum_partial_grads(model, ctx.tp_group)


def make_grad_norm_fn(
    model: nn.Module, ctx: ParallelContext
) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """The global gradient norm of a tensor/pipeline-sharded model, for the trainer's `grad_norm` hook.

    It reads the gradients from `model`'s parameters (replication is tagged on parameters, not on
    gradient tensors) and sums the squared shares over the model-parallel group.
    Pipeline note: a tied embedding held by the first and last stage would be counted twice.
    """

    def grad_norm(grads: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        return all_reduce_(grad_norm_squared(model, ctx.tp_rank), ctx.mp_group).sqrt()

    return grad_norm
