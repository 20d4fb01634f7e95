"""Pipeline stages: the stage module and the tied embedding across stages.

The model's layers are cut into p * v consecutive spans, one per virtual stage (`layout.split_layers`,
held by the run layout); virtual stage s = chunk * p + rank lives on pipeline rank `rank` as its
model chunk `chunk` (v = 1 without interleaving). Stage 0 also holds the embedding and the last
stage the final norm and the head. Every stage is a `PipelineStage`: a GPTModel built with only its
own layers and seeded by parameter name, so its weights are exactly those of the full model, and
parameter names match the full model's ("layers.7.attn.qkv_proj.weight"). `megatron_andromeda.builder`
builds them and applies the transforms per stage.

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

from megatron_andromeda.models.attention import KVCache
from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.fully_sharded import local_shard
from megatron_andromeda.parallel.grad_norm import shared_embedding


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
            dist.broadcast(local_shard(weight)[0], first, group=ctx.embedding_group)  # (FSDP: its shard)
