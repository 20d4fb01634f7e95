"""Causal self-attention with multi-head / grouped-query / multi-query key-value heads.

Head counts are read from `self.num_heads` / `self.num_kv_heads` at run time, so that tensor
parallelism can shard the projections and set the per-rank counts without touching this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.models.rotary import apply_rotary


@dataclass(frozen=True)
class QKVLayout:
    """The rows of the fused q/k/v projection: every query head, then the key heads, then the value heads.

    The one description of that layout: attention splits its projection with it, tensor parallelism
    shards it (parallel/sharding.py), and the Hugging Face conversion splits and joins it (hf/).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> QKVLayout:
        return cls(cfg.num_heads, cfg.num_kv_heads, cfg.kv_channels)

    @property
    def q_rows(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        """Rows of the keys (and as many of the values)."""
        return self.num_kv_heads * self.head_dim

    @property
    def rows(self) -> int:
        return self.q_rows + 2 * self.kv_rows

    def split(self, fused: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) views of a fused weight (dim 0) or of the projection's output (dim -1)."""
        return fused.split([self.q_rows, self.kv_rows, self.kv_rows], dim=dim)

    @staticmethod
    def join(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat((q, k, v))


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its hidden states; built once per forward."""

    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin
    mask: torch.Tensor | None = None  # bool (B|1, 1, Tq, Tk), True = attend; None = plain causal
    bias: torch.Tensor | None = None  # float additive bias (ALiBi), (B|1, H, Tq, Tk), causal included
    is_causal: bool = True  # only consulted when mask and bias are None


@dataclass
class KVCache:
    """Keys and values of past positions for incremental decoding, one entry per layer."""

    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, kvH, T, hd)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v; its own module so that selective recomputation can wrap it."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
    ) -> torch.Tensor:
        # q: (B, H, Tq, hd); k, v: (B, kvH, Tk, hd)
        gqa = k.shape[1] != q.shape[1]
        if gqa and not _sdpa_shares_kv(q, inputs):
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = False
        dropout = self.dropout if self.training else 0.0
        if inputs.bias is not None:
            mask, causal = inputs.bias.to(q.dtype), False
        else:
            mask, causal = inputs.mask, inputs.mask is None and inputs.is_causal
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, enable_gqa=gqa
        )


def _sdpa_shares_kv(q: torch.Tensor, inputs: AttentionInputs) -> bool:
    """Whether SDPA's `enable_gqa` is the fast way to serve several query heads per KV head.

    It reads each KV head in place instead of copying it per query head (and summing the copies'
    gradients back): faster on CPU in every path. On CUDA only the plain causal path keeps a fused
    kernel with it; with a mask or bias SDPA would fall back to its slow math kernel.
    """
    return q.device.type == "cpu" or (inputs.mask is None and inputs.bias is None)


class Attention(nn.Module):
    """Fused q/k/v projection (rows: all q heads, then k heads, then v heads), rotary, core, output."""

    # The rotation kernel; megatron_andromeda.backends may put a fused one here.
    rotary_fn = staticmethod(apply_rotary)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.kv_channels
        self.rotary_interleaved = cfg.rotary_interleaved
        self.qkv_proj = nn.Linear(cfg.hidden_size, QKVLayout.of(cfg).rows, bias=False)
        self.core = CoreAttention(cfg.dropout)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None = None, layer: str = ""
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        # Head counts are read now: tensor parallelism sets this rank's share after construction.
        q, k, v = QKVLayout(self.num_heads, self.num_kv_heads, hd).split(self.qkv_proj(x), dim=-1)
        q = q.view(B, T, self.num_heads, hd)
        k = k.view(B, T, self.num_kv_heads, hd)
        v = v.view(B, T, self.num_kv_heads, hd)
        if inputs.rotary is not None:
            cos, sin = inputs.rotary
            q = self.rotary_fn(q, cos, sin, self.rotary_interleaved)
            k = self.rotary_fn(k, cos, sin, self.rotary_interleaved)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = self.core(q, k, v, inputs)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * hd)
        return self.o_proj(out)


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """Per-head ALiBi slopes (MPT's variant: geometric, interleaved when heads are not a power of 2)."""
    power = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2.0, torch.arange(1, power + 1, dtype=torch.float64) * (max_bias / power))
    if power != num_heads:
        slopes = torch.cat((slopes[1::2], slopes[::2]))[:num_heads]
    return slopes.float()


def alibi_bias(slopes: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """Additive bias slope * (k - q), -inf above the diagonal; (1, H, Tq, Tk)."""
    distance = (k_positions[None, :] - q_positions[:, None]).float()  # (Tq, Tk)
    bias = slopes[:, None, None] * distance[None]
    bias = bias.masked_fill(distance[None] > 0, float("-inf"))
    return bias[None]
