"""One function builds each rank's model, for one process and for many: `build_model(cfg, ctx, kernels)`.

It is the only place where the transforms of a model are applied, always in this order, so each
one sees what the ones before it made:

1. **layers**: the whole model for one process, else this rank's pipeline stage, or its model
   chunks under the interleaved schedule (an `nn.ModuleList`); weights are drawn per parameter
   name from `train.seed`, so every layout starts from the same weights;
2. **tensor / sequence parallelism** (`parallel.parallelize_model`): shards, per-rank head counts,
   region hooks; the model then moves to its device;
3. **kernels** (`kernels.apply_kernels`): the flash attention core, Transformer Engine modules
   (holding the shards tensor parallelism made, norms fused: te_layers.py), fused rotary, swapped
   into the modules tensor parallelism left (keeping its hooks);
4. **recomputation** (`parallel.recompute.apply_recompute`): wraps the modules as they are now,
   so a recomputed attention core is the flash core, a recomputed block holds the TE linears;
5. **compile** (`kernels.compile_blocks`): compiles each block as it is now, recomputation included;
6. **precision**: parameters cast to `train.precision` (the optimizer keeps fp32 master copies);
   with `parallel.data_sharding=full`, FSDP2 instead (`parallel.fully_sharded.shard_model`): each
   block and then the stage become units whose fp32 parameters are sharded over the data group and
   gathered in `train.precision` for compute; it wraps the blocks as compile and recomputation
   left them.

The last stage's copy of a tied embedding is then synchronised from the first stage. Parameter
names never change, so checkpoints, resharding and optimizer groups see the same keys on every
layout and with every kernel.
"""

from __future__ import annotations

from torch import nn

from megatron_andromeda.config import RunConfig
from megatron_andromeda.kernels import BackendChoice, apply_kernels, compile_blocks, fused_cross_entropy
from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.fully_sharded import shard_model
from megatron_andromeda.parallel.hooks import run_layout
from megatron_andromeda.parallel.loss import LossFn, make_loss_fn
from megatron_andromeda.parallel.mixed_precision import cast_parameters, precision_dtype
from megatron_andromeda.parallel.parallelize import parallelize_model
from megatron_andromeda.parallel.pipeline.stages import PipelineStage, sync_tied_embedding_weights
from megatron_andromeda.parallel.recompute import apply_recompute


def build_model(
    cfg: RunConfig,
    ctx: ParallelContext,
    kernels: BackendChoice | None = None,
    *,
    compile_backend: str = "inductor",
) -> nn.Module:
    """This rank's model, every transform applied in the documented order (module docstring).

    Returns a GPTModel (one process, or a pipeline stage: a PipelineStage) or, with
    `parallel.virtual_stages > 1`, an nn.ModuleList of this rank's chunks. `kernels` defaults to
    the plain choice (SDPA, nn.Linear, torch rotary).
    """
    kernels = kernels or BackendChoice()
    layout = run_layout(ctx)
    dtype = precision_dtype(cfg.train.precision)
    chunks = []
    for stage, span in layout.spans_of(ctx.pp_rank):
        chunk = stage_module(cfg.model, stage, span, len(layout.stage_spans), cfg.train.seed)  # 1. layers
        parallelize_model(chunk, ctx, cfg.parallel)  # 2. tensor / sequence parallel
        chunk.to(ctx.device)
        apply_kernels(chunk, kernels)  # 3. kernels
        apply_recompute(chunk, cfg.parallel.recompute, ctx.rng)  # 4. recomputation
        if kernels.compile:
            compile_blocks(chunk, compile_backend)  # 5. compile
        if layout.fully_sharded:
            shard_model(chunk, ctx, dtype)  # 6. precision by FSDP2, which shards the parameters
        else:
            cast_parameters(chunk, dtype)  # 6. precision
        chunks.append(chunk)
    model = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
    sync_tied_embedding_weights(model, ctx)
    return model


def stage_module(
    cfg: ModelConfig, stage: int, span: range, num_stages: int, init_seed: int | None = None
) -> GPTModel:
    """The layers of virtual stage `stage` (of `num_stages`): the whole model when there is one; the
    first stage holds the embedding, the last the final norm and the head. `init_seed=None` leaves
    the default initialisation (e.g. on the meta device, to list the stage's parameters)."""
    if num_stages == 1:
        return GPTModel(cfg, init_seed=init_seed)
    return PipelineStage(
        cfg,
        layer_ids=span,
        pre_process=stage == 0,
        post_process=stage == num_stages - 1,
        init_seed=init_seed,
    )


def build_loss_fn(ctx: ParallelContext, kernels: BackendChoice, real_vocab_size: int | None) -> LossFn:
    """The training loss for this layout and these kernels; padding ids >= real_vocab_size are masked."""
    fused = fused_cross_entropy() if kernels.cross_entropy == "flash" else None
    return make_loss_fn(ctx, real_vocab_size=real_vocab_size, fused=fused)
