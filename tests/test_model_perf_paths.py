"""The model's fast paths against the plain formulas they replace, values and gradients.

- interleaved rotary in fp32/fp64 is a complex multiply (models/rotary.py);
- multi-query / grouped attention lets SDPA share KV heads (`enable_gqa`) instead of copying them
  (models/attention.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_andromeda.models.attention import AttentionInputs, CoreAttention, _sdpa_shares_kv
from megatron_andromeda.models.rotary import RotaryEmbedding, apply_rotary


def slice_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pair (x[2j], x[2j+1]) turned by the angle whose cos / sin are given: the textbook form."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def value_and_grad(fn, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positions", ["arange", "explicit"])
def test_complex_rotary_matches_slice_formula_on_fused_qkv_views(dtype, positions):
    B, T, H, hd = 2, 7, 3, 8
    torch.manual_seed(0)
    rot = RotaryEmbedding(hd, max_positions=16, base=500.0).to(dtype)
    position_ids = torch.randint(0, 16, (B, T)) if positions == "explicit" else None
    cos, sin = rot(position_ids, T)
    fused = torch.randn(B, T, (H + 2) * hd, dtype=dtype)  # rows [q heads; k head; v head]
    views = {
        "q": lambda t: t[..., : H * hd].view(B, T, H, hd),
        "k": lambda t: t[..., H * hd : (H + 1) * hd].view(B, T, 1, hd),
    }
    for name, view in views.items():
        weight = torch.randn_like(view(fused))

        def ours(t, view=view):
            return apply_rotary(view(t), cos, sin, interleaved=True)

        def reference(t, view=view):
            return slice_rotary(view(t), cos, sin)

        got, got_grad = value_and_grad(ours, fused, weight)
        want, want_grad = value_and_grad(reference, fused, weight)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{name} values")
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6, msg=f"{name} grads")


def test_complex_rotary_copies_inputs_whose_pairs_are_misaligned():
    """A view starting at an odd offset cannot be read as complex numbers in place."""
    cos, sin = RotaryEmbedding(4, max_positions=8)(None, 5)
    flat = torch.randn(1 + 5 * 2 * 4)
    odd_offset = flat[1:].view(1, 5, 2, 4)
    transposed = torch.randn(1, 5, 4, 2).transpose(-1, -2)  # pairs are not adjacent in memory
    for x in (odd_offset, transposed):
        torch.testing.assert_close(apply_rotary(x, cos, sin, True), slice_rotary(x, cos, sin))


def test_half_precision_keeps_the_real_valued_path():
    cos, sin = RotaryEmbedding(8, max_positions=8)(None, 6)
    x = torch.randn(2, 6, 2, 8)
    got = apply_rotary(x.bfloat16(), cos, sin, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), slice_rotary(x, cos, sin), rtol=2e-2, atol=2e-2)


def attention_cases(B: int, H: int, T: int) -> dict[str, tuple[AttentionInputs, int]]:
    """Each attention path with its query length: causal, packed-document mask, ALiBi bias, decode."""
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    mask[0, :, T // 2 :, : T // 2] = False  # two documents in the first row
    bias = torch.randn(1, H, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return {
        "causal": (AttentionInputs(), T),
        "mask": (AttentionInputs(mask=mask), T),
        "bias": (AttentionInputs(bias=bias), T),
        "decode": (AttentionInputs(is_causal=False), 1),
    }


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("case", ["causal", "mask", "bias", "decode"])
def test_shared_kv_attention_matches_repeated_heads(kv_heads, case):
    B, H, T, hd = 2, 4, 6, 8
    torch.manual_seed(1)
    inputs, Tq = attention_cases(B, H, T)[case]
    q = torch.randn(B, H, Tq, hd, requires_grad=True)
    k = torch.randn(B, kv_heads, T, hd, requires_grad=True)
    v = torch.randn(B, kv_heads, T, hd, requires_grad=True)
    weight = torch.randn(B, H, Tq, hd)

    got = CoreAttention(dropout=0.0)(q, k, v, inputs)
    got_grads = torch.autograd.grad((got * weight).sum(), (q, k, v))

    groups = H // kv_heads
    k_rep, v_rep = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if inputs.bias is not None:
        want = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=inputs.bias)
    elif inputs.mask is not None:
        want = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=inputs.mask)
    else:
        want = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=inputs.is_causal)
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"grad of {name}")


def test_kv_sharing_policy_keeps_fused_kernels_off_cpu():
    """Off CPU, masked attention must copy KV heads: SDPA's masked GPU kernels lack `enable_gqa`."""
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    cpu, meta = torch.empty(1, 2, 4, 8), torch.empty(1, 2, 4, 8, device="meta")
    assert _sdpa_shares_kv(cpu, AttentionInputs(mask=mask))
    assert _sdpa_shares_kv(meta, AttentionInputs())
    assert not _sdpa_shares_kv(meta, AttentionInputs(mask=mask))
    assert not _sdpa_shares_kv(meta, AttentionInputs(bias=mask.float()))
