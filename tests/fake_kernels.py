"""Fake flash-attn and Transformer Engine libraries for CPU tests (pytest fixtures).

Each fake is installed in `sys.modules` for one test: its kernels compute the reference math and
record their calls, so the code paths that import and call the real libraries run on a CPU and the
tests can count what was called. `fake_flash` also lets the kernel paths accept CPU tensors.
"""

from __future__ import annotations

import contextlib
import enum
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda import kernels


def reference_attention(q, k, v, causal):
    """Attention on (B, T, H, hd) tensors, computed in fp32 the textbook way."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2).float(), v.repeat_interleave(groups, dim=2).float()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[1]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).to(q.dtype)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attn with a recording flash_attn_func, a rotary kernel and a cross-entropy kernel."""
    calls: list[dict] = []
    root = types.ModuleType("flash_attn")
    root.__version__ = "2.7.4"

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        calls.append(
            {"q": tuple(q.shape), "k": tuple(k.shape), "causal": causal, "contiguous": q.is_contiguous()}
        )
        return reference_attention(q, k, v, causal)

    def apply_rotary_emb(x, cos, sin, interleaved=False):
        calls.append({"rotary": tuple(cos.shape), "interleaved": interleaved})
        d = cos.shape[-1]
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, d/2) over (B, T, H, d/2)
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d], x[..., d:])
        r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        return torch.stack((r1, r2), -1).flatten(-2) if interleaved else torch.cat((r1, r2), -1)

    def cross_entropy_loss(logits, labels, lse_square_scale=0.0):
        calls.append({"ce": tuple(logits.shape), "dtype": logits.dtype})
        lse = torch.logsumexp(logits.float(), dim=-1)
        z = lse_square_scale * lse.square()
        return lse - logits.float().gather(1, labels[:, None])[:, 0] + z, z.detach()

    root.flash_attn_func = flash_attn_func
    rotary = types.ModuleType("flash_attn.layers.rotary")
    rotary.apply_rotary_emb = apply_rotary_emb
    ce = types.ModuleType("flash_attn.ops.triton.cross_entropy")
    ce.cross_entropy_loss = cross_entropy_loss
    for name, module in (
        ("flash_attn", root),
        ("flash_attn.layers.rotary", rotary),
        ("flash_attn.ops.triton.cross_entropy", ce),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", ("cuda", "cpu"))  # let the kernels see CPU tensors
    return calls


@pytest.fixture
def fake_te(monkeypatch):
    """transformer_engine with a recording Linear and fp8_autocast."""
    log: dict[str, list] = {"linear": [], "autocast": []}

    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__()
            log["linear"].append((in_features, out_features, bias, params_dtype, torch.device(device)))
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features, dtype=params_dtype, device=device)
            )

        def forward(self, x):
            return F.linear(x, self.weight)

    @contextlib.contextmanager
    def fp8_autocast(enabled=False, fp8_recipe=None, fp8_group=None):
        log["autocast"].append((enabled, fp8_recipe, fp8_group))
        yield

    class Format(enum.Enum):
        E4M3 = "e4m3"
        HYBRID = "hybrid"

    @dataclass
    class DelayedScaling:
        fp8_format: Format
        amax_history_len: int
        amax_compute_algo: str

    @dataclass
    class Float8CurrentScaling:
        fp8_format: Format

    root, pytorch_mod = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    root.__version__ = "2.4.0"
    pytorch_mod.Linear, pytorch_mod.fp8_autocast = Linear, fp8_autocast
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format, recipe.DelayedScaling, recipe.Float8CurrentScaling = (
        Format,
        DelayedScaling,
        Float8CurrentScaling,
    )
    for name, module in (
        ("transformer_engine", root),
        ("transformer_engine.pytorch", pytorch_mod),
        ("transformer_engine.common.recipe", recipe),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return log
