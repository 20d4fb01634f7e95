"""Model math: causality, rotary, MQA/MHA equivalence, parameter counts, overfitting."""

import math

import pytest
import torch

from megatron_andromeda.config import ModelConfig
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.models.accounting import count_parameters, training_flops_per_token
from megatron_andromeda.models.presets import NOMINAL_PARAMETERS, PRESETS
from megatron_andromeda.models.rotary import RotaryEmbedding, apply_rotary, rotary_permutation

PALM = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1)
MPT = dict(
    vocab_size=97,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    block="sequential",
    activation="gelu",
    position_embedding="alibi",
    z_loss=0.0,
)
LLAMA = dict(
    vocab_size=97,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    block="sequential",
    norm="rmsnorm",
    rotary_interleaved=False,
    tie_embeddings=False,
)
SHAPES = {"palm": PALM, "mpt": MPT, "llama": LLAMA}


def tiny(kind: str, **overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(ModelConfig(**{**SHAPES[kind], **overrides})).eval()


@pytest.mark.parametrize("kind", SHAPES)
def test_causality(kind):
    model = tiny(kind)
    tokens = torch.randint(0, 97, (2, 12))
    base = model(tokens)
    for t in range(11):
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def direct_rotary(x: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """RoPE written out pair by pair from the definition, in float64."""
    B, T, H, d = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for pos in range(T):
        for j in range(d // 2):
            theta = pos * base ** (-2 * j / d)
            a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + d // 2)
            xa, xb = x[:, pos, :, a].double(), x[:, pos, :, b].double()
            out[:, pos, :, a] = xa * math.cos(theta) - xb * math.sin(theta)
            out[:, pos, :, b] = xb * math.cos(theta) + xa * math.sin(theta)
    return out


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_matches_direct_formula(interleaved):
    x = torch.randn(2, 9, 3, 8)
    rope = RotaryEmbedding(8, 16, base=500.0, interleaved=interleaved)
    cos, sin = rope(None, 9)
    got = apply_rotary(x, cos, sin, interleaved)
    torch.testing.assert_close(got.double(), direct_rotary(x, 500.0, interleaved), rtol=1e-5, atol=1e-5)
    # explicit position ids give the same tables
    cos_p, sin_p = rope(torch.arange(9).expand(2, 9), 9)
    torch.testing.assert_close(apply_rotary(x, cos_p, sin_p, interleaved), got)


def test_rotary_permutation_links_conventions():
    x = torch.randn(1, 5, 2, 8)
    perm = rotary_permutation(8)
    inter = RotaryEmbedding(8, 8, interleaved=True)
    half = RotaryEmbedding(8, 8, interleaved=False)
    a = apply_rotary(x, *inter(None, 5), True)[..., perm]
    b = apply_rotary(x[..., perm], *half(None, 5), False)
    torch.testing.assert_close(a, b)


def test_mqa_equals_mha_with_copied_kv_head():
    mqa = tiny("palm", num_kv_heads=1)
    mha = GPTModel(ModelConfig(**{**PALM, "num_kv_heads": 4})).eval()
    hd, nh = 16, 4
    state = mqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith("qkv_proj.weight"):
            q, k, v = w.split([nh * hd, hd, hd])
            state[name] = torch.cat([q, k.repeat(nh, 1), v.repeat(nh, 1)])
    mha.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(mha(tokens), mqa(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_formula(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = GPTModel(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(cfg).total
    if name in NOMINAL_PARAMETERS:
        assert abs(built / NOMINAL_PARAMETERS[name] - 1) <= 0.10


def test_palm_presets_follow_the_seed_table():
    table = {"palm-150m": (768, 12), "palm-410m": (1024, 24), "palm-1b": (2048, 16)}
    for name, (dim, depth) in table.items():
        cfg = PRESETS[name]
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.kv_channels) == (dim, depth, 8, 128)
        assert cfg.vocab_size == 50304 and cfg.num_kv_heads == 1 and cfg.ffn_size == 4 * dim
    mpt = PRESETS["mpt-7b"]
    assert (mpt.num_layers, mpt.num_heads, mpt.hidden_size, mpt.vocab_size) == (32, 32, 4096, 50432)


def test_flops_formula_on_known_shape():
    cfg = ModelConfig(**PALM)
    n = count_parameters(cfg).non_embedding + 97 * 64
    assert training_flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 4 * 16 * 32


@pytest.mark.parametrize("kind", SHAPES)
def test_tiny_model_overfits_one_batch(kind):
    model = tiny(kind).train()
    tokens = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, _ = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:], z_loss=1e-4)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_kv_cache_matches_full_forward():
    for kind in SHAPES:
        from megatron_andromeda.models import KVCache

        model = tiny(kind)
        tokens = torch.randint(0, 97, (2, 14))
        cache = KVCache()
        parts = [
            model(tokens[:, :6], cache=cache),
            model(tokens[:, 6:7], cache=cache),
            model(tokens[:, 7:], cache=cache),
        ]
        torch.testing.assert_close(torch.cat(parts, dim=1), model(tokens), rtol=1e-5, atol=1e-5)


def test_segments_do_not_attend_across_documents():
    for kind in SHAPES:
        model = tiny(kind)
        tokens = torch.randint(0, 97, (2, 12))
        segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4])
        packed = model(tokens, segment_ids=segments)
        for b, cut in ((0, 5), (1, 8)):
            alone = model(tokens[b : b + 1, cut:])
            torch.testing.assert_close(packed[b : b + 1, cut:], alone, rtol=1e-5, atol=1e-5)


def test_loss_mask_and_z_loss():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.zeros(2, 5)
    mask[0, :2] = 1
    loss, parts = language_model_loss(logits, labels, mask, z_loss=0.0)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    torch.testing.assert_close(loss, expected)
    total, parts = language_model_loss(logits, labels, mask, z_loss=0.5)
    z = torch.logsumexp(logits[0, :2], -1).square().mean()
    torch.testing.assert_close(total, expected + 0.5 * z)
    torch.testing.assert_close(parts["z_loss"], z)


def test_seeded_init_is_layout_independent():
    cfg = ModelConfig(**{**PALM, "num_layers": 4, "tie_embeddings": False})
    full = GPTModel(cfg, init_seed=5)
    first = GPTModel(cfg, init_seed=5, layer_ids=[0, 1], post_process=False)
    last = GPTModel(cfg, init_seed=5, layer_ids=[2, 3], pre_process=False)
    full_state = full.state_dict()
    for part in (first, last):
        for name, tensor in part.state_dict().items():
            assert torch.equal(tensor, full_state[name]), name
    assert not torch.equal(GPTModel(cfg, init_seed=6).embedding.weight, full.embedding.weight)
