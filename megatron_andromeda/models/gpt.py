"""The decoder: embedding -> blocks -> final norm -> (tied) output head, plus its loss.

Pipeline-friendly by construction: a stage builds the model with the slice of layer indices it
owns (`layer_ids`) and with or without the embedding (`pre_process`) and the head (`post_process`).
Layers live in a ModuleDict keyed by their global index, so parameter names are the same on every
layout ("layers.7.attn.qkv_proj.weight"), which is what checkpoint resharding relies on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda.models.attention import AttentionInputs, KVCache, alibi_bias, alibi_slopes
from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.models.layers import make_block, make_norm
from megatron_andromeda.models.rotary import RotaryEmbedding
from megatron_andromeda.models.vocab import mask_padding_logits


class GPTModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layer_ids: Sequence[int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        init_seed: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if pre_process else None
        self.layers = nn.ModuleDict({str(i): make_block(cfg) for i in layer_ids})
        self.final_norm = make_norm(cfg) if post_process else None
        # A separate head only when it cannot share the embedding held by this same module.
        own_head = post_process and not (cfg.tie_embeddings and pre_process)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if own_head else None
        if cfg.position_embedding == "rotary":
            self.rotary = RotaryEmbedding(
                cfg.kv_channels, cfg.max_seq_length, cfg.rotary_base, cfg.rotary_interleaved
            )
        else:
            self.rotary = None
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_heads), persistent=False)
        # A non-first pipeline stage under sequence parallelism receives 1/n of the sequence
        # (parallel/parallelize.py sets n); attention masks and rotary tables need the full length.
        self.input_sequence_shards = 1
        self.reset_parameters(init_seed)

    # ------------------------------------------------------------------------------------------ init
    def reset_parameters(self, seed: int | None = None) -> None:
        """N(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * num_layers).

        With a `seed`, each parameter draws from its own generator seeded by (seed, parameter name),
        so a pipeline stage that builds only its own layers gets exactly the weights the full model
        would have; without one, parameters draw from torch's global generator in order.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            generator = None
            if seed is not None:
                generator = torch.Generator(device=p.device).manual_seed(
                    seed * 1_000_003 + _stable_hash(name)
                )
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embedding.weight

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) on the first stage, hidden states (B, T, D) elsewhere.

        Returns logits (B, T, V) on the last stage, hidden states (B, T, D) on the others.
        `segment_ids` (B, T) keeps attention inside each packed document; `cache` enables
        incremental decoding (positions continue from `cache.length`).
        """
        h = self.embedding(x) if self.pre_process else x
        T = h.shape[1] * self.input_sequence_shards
        past = cache.length if cache is not None else 0
        inputs = self.attention_inputs(T, past, position_ids, segment_ids, h.device)
        for name, layer in self.layers.items():
            h = layer(h, inputs, cache, name)
        if cache is not None:
            cache.length += T
        if not self.post_process:
            return h
        h = self.final_norm(h)
        logits = F.linear(h, self.output_weight)
        return logits * self.cfg.logit_scale if self.cfg.logit_scale != 1.0 else logits

    def attention_inputs(
        self,
        T: int,
        past: int,
        position_ids: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        device: torch.device,
    ) -> AttentionInputs:
        inputs = AttentionInputs()
        if self.rotary is not None:
            inputs.rotary = self.rotary(position_ids, T, offset=past)
        mask = None
        if segment_ids is not None or (past and T > 1):
            q_pos = torch.arange(past, past + T, device=device)
            k_pos = torch.arange(past + T, device=device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, past+T)
            if segment_ids is not None:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
                mask = mask & same[:, None]
        if self.rotary is None:
            positions = torch.arange(past + T, device=device)
            bias = alibi_bias(self.alibi_slopes, positions[past:], positions)
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            inputs.bias = bias
        else:
            inputs.mask = mask
        inputs.is_causal = past == 0 or T > 1
        return inputs


def _stable_hash(name: str) -> int:
    """A process-independent 31-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") >> 1


def language_model_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    z_loss: float = 0.0,
    *,
    real_vocab_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over unmasked tokens, plus PaLM's z-loss; computed in fp32.

    Ids >= `real_vocab_size` (vocabulary padding, see models/vocab.py) get probability zero, in the
    cross-entropy and in the z-loss's logsumexp. Returns the loss to backpropagate and detached
    parts for logging (`lm_loss`, `z_loss`).
    """
    flat = mask_padding_logits(logits.float(), real_vocab_size).reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, labels.reshape(-1), reduction="none")
    lse_squared = torch.logsumexp(flat, dim=-1).square() if z_loss > 0 else None
    return reduce_token_losses(ce, loss_mask, labels.shape[0], lse_squared, z_loss)


def reduce_token_losses(
    ce: torch.Tensor,
    loss_mask: torch.Tensor | None,
    batch_size: int,
    lse_squared: torch.Tensor | None = None,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token cross-entropy (and logsumexp^2) -> the step's loss and its logged parts.

    The one reduction every loss path shares (plain, vocabulary-parallel, fused kernel): means over
    the unmasked tokens, `z_loss * mean(lse^2)` added when z_loss > 0, and each sample's summed
    loss and token count for the per-source losses of a blended batch.
    """
    mask = torch.ones_like(ce) if loss_mask is None else loss_mask.reshape(-1).to(ce.dtype)
    denom = mask.sum().clamp(min=1.0)
    lm_loss = (ce * mask).sum() / denom
    total = lm_loss
    parts = {"lm_loss": lm_loss.detach(), **sample_totals(ce, mask, batch_size)}
    if z_loss > 0 and lse_squared is not None:
        z = (lse_squared * mask).sum() / denom
        total = total + z_loss * z
        parts["z_loss"] = z.detach()
    return total, parts


def sample_totals(token_losses: torch.Tensor, mask: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Each sample's summed cross-entropy and loss-token count (detached): the trainer builds
    per-source losses of a blended batch from them."""
    return {
        "sample_loss_sum": (token_losses.detach() * mask).reshape(batch_size, -1).sum(dim=1),
        "sample_tokens": mask.reshape(batch_size, -1).sum(dim=1),
    }
