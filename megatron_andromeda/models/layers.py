"""Norms, MLPs and the two transformer blocks (PaLM parallel, pre-norm sequential)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda.models.attention import Attention, AttentionInputs, KVCache
from megatron_andromeda.models.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=False)


class MLP(nn.Module):
    """SwiGLU (fused gate/up projection, rows [gate; up]) or a plain GELU MLP; no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        ffn = cfg.ffn_size
        if self.swiglu:
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * ffn, bias=False)
        else:
            self.up_proj = nn.Linear(cfg.hidden_size, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x)))


class ParallelBlock(nn.Module):
    """PaLM: x + attn(norm(x)) + mlp(norm(x)), one norm feeding both branches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None = None, layer: str = ""
    ) -> torch.Tensor:
        h = self.norm(x)
        return x + self.dropout(self.attn(h, inputs, cache, layer) + self.mlp(h))


class SequentialBlock(nn.Module):
    """Pre-norm: x += attn(norm1(x)); x += mlp(norm2(x)) (GPT / Llama / MPT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None = None, layer: str = ""
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), inputs, cache, layer))
        return x + self.dropout(self.mlp(self.norm2(x)))


def make_block(cfg: ModelConfig) -> nn.Module:
    return ParallelBlock(cfg) if cfg.block == "parallel" else SequentialBlock(cfg)
