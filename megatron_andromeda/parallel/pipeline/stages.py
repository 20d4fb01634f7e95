"""Pipeline stages: which layers each rank holds, the stage modules, and the tied embedding across them.

The model's layers are cut into p * v consecutive spans, one per virtual stage; virtual stage
s = chunk * p + rank lives on pipeline rank `rank` as its model chunk `chunk` (v = 1 without
interleaving). Stage 0 also holds the embedding and the last stage the final norm and the head.
Every stage is a `PipelineStage`: a GPTModel built with only its own layers and seeded by parameter
name, so its weights are exactly those of the full model, and parameter names match the full model's
("layers.7.attn.qkv_proj.weight"). Tensor parallelism and recomputation are applied per stage.

With tied embeddings the last stage holds its own copy of the embedding as `lm_head.weight`: it is
copied from stage 0 at build time (`sync_tied_embedding_weights`) and the two gradients are summed
every step (data_parallel.finish_gradients, over the context's embedding group), so both copies
take the same optimizer steps and stay equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.config import ConfigError, ModelConfig, RunConfig
from megatron_andromeda.models.attention import KVCache
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.grad_norm import shared_embedding
from megatron_andromeda.parallel.parallelize import parallelize_model
from megatron_andromeda.parallel.recompute import apply_recompute


# --------------------------------------------------------------------------------------------- layer split
def split_layers(
    num_layers: int, pipeline: int, virtual_stages: int = 1, layers_per_stage: Sequence[int] | None = None
) -> list[range]:
    """The layer indices of each virtual stage, in stage order (stage s = chunk * pipeline + rank).

    Balanced by default; when the layers do not divide evenly the first stages take one more, since
    the last stage also runs the output head and the loss. `layers_per_stage` gives the counts
    explicitly: one per pipeline rank, or one per virtual stage when interleaving.
    """
    stages = pipeline * virtual_stages
    if layers_per_stage:
        counts = list(layers_per_stage)
        if len(counts) != stages:
            raise ConfigError(
                f"parallel.layers_per_stage has {len(counts)} entries but there are {stages} stages "
                f"(parallel.pipeline={pipeline} x parallel.virtual_stages={virtual_stages}); "
                "give one count per stage, in stage order"
            )
        if sum(counts) != num_layers or min(counts) < 1:
            raise ConfigError(
                f"parallel.layers_per_stage={counts} must be positive counts summing to "
                f"model.num_layers={num_layers}"
            )
    else:
        if num_layers < stages:
            raise ConfigError(
                f"model.num_layers={num_layers} cannot give each of the {stages} pipeline stages "
                f"(parallel.pipeline={pipeline} x parallel.virtual_stages={virtual_stages}) a layer"
            )
        base, extra = divmod(num_layers, stages)
        counts = [base + (s < extra) for s in range(stages)]
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


# --------------------------------------------------------------------------------------------- stage module
class PipelineStage(GPTModel):
    """A GPTModel holding one stage's layers; non-first stages read the activation set by the schedule.

    The trainer's `forward_step` calls every stage as `model(tokens, position_ids=..., segment_ids=...)`:
    the first stage embeds the tokens, the others ignore them and use the tensor last given to
    `set_input_tensor` (positions and segments still come from the batch).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layer_ids: Sequence[int],
        pre_process: bool,
        post_process: bool,
        init_seed: int | None = None,
    ):
        super().__init__(
            cfg, layer_ids=layer_ids, pre_process=pre_process, post_process=post_process, init_seed=init_seed
        )
        self._input: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self._input = tensor

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.pre_process:
            return super().forward(tokens, position_ids, segment_ids, cache)
        if self._input is None:
            raise RuntimeError(
                "a non-first pipeline stage needs set_input_tensor(hidden) before each forward"
            )
        hidden, self._input = self._input, None  # (B, T, D)
        return super().forward(hidden, position_ids, segment_ids, cache)


def build_pipeline_model(run_cfg: RunConfig, ctx: ParallelContext) -> nn.Module:
    """This rank's stage (or nn.ModuleList of chunks when interleaving), sharded and ready to train.

    Weights equal the full model's built with `init_seed=train.seed`; the tied head copy is
    synchronised from the first stage (a collective over the embedding group: call on every rank).
    """
    pc = run_cfg.parallel
    p, v = ctx.pp_size, pc.virtual_stages
    spans = split_layers(run_cfg.model.num_layers, p, v, pc.layers_per_stage)
    chunks = []
    for chunk in range(v):
        stage = chunk * p + ctx.pp_rank
        module = PipelineStage(
            run_cfg.model,
            layer_ids=spans[stage],
            pre_process=stage == 0,
            post_process=stage == p * v - 1,
            init_seed=run_cfg.train.seed,
        )
        parallelize_model(module, ctx, pc)
        apply_recompute(module, pc.recompute, ctx.rng)
        chunks.append(module.to(ctx.device))
    model = chunks[0] if v == 1 else nn.ModuleList(chunks)
    sync_tied_embedding_weights(model, ctx)
    return model


# --------------------------------------------------------------------------------------------- tied embedding
def sync_tied_embedding_weights(model: nn.Module, ctx: ParallelContext) -> None:
    """Copy the first stage's embedding into the last stage's head (after building or loading weights).

    A collective over the embedding group; a no-op without pipelining or without tied embeddings.
    Their gradients are summed every step by data_parallel.finish_gradients.
    """
    weight = shared_embedding(model, ctx)
    if weight is not None:
        with torch.no_grad():
            first = dist.get_global_rank(ctx.embedding_group, 0)
            dist.broadcast(weight.data, first, group=ctx.embedding_group)
