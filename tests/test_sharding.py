"""Weight split / merge for tensor parallelism, with no process group."""

from __future__ import annotations

import pytest
import torch

from megatron_andromeda.config import ModelConfig
from megatron_andromeda.models.attention import Attention, AttentionInputs
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.models.layers import MLP
from megatron_andromeda.parallel.sharding import (
    kv_replicas,
    merge_param,
    merge_state_dicts,
    shard_param,
    shard_shape,
    shard_state_dict,
    split_kind,
)

PALM = dict(block="parallel", activation="swiglu", position_embedding="rotary")
MPT = dict(block="sequential", activation="gelu", position_embedding="alibi", tie_embeddings=False)


def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, max_seq_length=16)
    return ModelConfig(**{**base, **overrides})


LAYOUTS = [
    pytest.param(family, kv, tp, id=f"{family['block']}-kv{kv}-tp{tp}")
    for family in (PALM, MPT)
    for kv in (1, 2, 8)
    for tp in (1, 2, 4, 8)
]


@pytest.mark.parametrize(("family", "kv", "tp"), LAYOUTS)
def test_round_trip_and_shapes(family, kv, tp):
    cfg = config(**family, num_kv_heads=kv)
    full = GPTModel(cfg).state_dict()
    shards = [shard_state_dict(full, cfg, rank, tp) for rank in range(tp)]
    for name, tensor in full.items():
        expected = shard_shape(name, tensor.shape, cfg, tp)
        assert all(s[name].shape == expected for s in shards), name
        if split_kind(name) != "replicated" and tp > 1:
            assert sum(s[name].numel() for s in shards) >= tensor.numel()
    merged = merge_state_dicts(shards, cfg)
    assert merged.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name


def test_shard_shapes_of_named_parameters():
    cfg = config(**PALM, num_kv_heads=1, hidden_size=64, ffn_hidden_size=96)
    hd = cfg.kv_channels
    assert shard_shape("layers.0.attn.qkv_proj.weight", ((8 + 2) * hd, 64), cfg, 4) == ((2 + 2) * hd, 64)
    assert shard_shape("layers.0.attn.o_proj.weight", (64, 8 * hd), cfg, 4) == (64, 2 * hd)
    assert shard_shape("layers.0.mlp.gate_up_proj.weight", (192, 64), cfg, 4) == (48, 64)
    assert shard_shape("layers.0.mlp.down_proj.weight", (64, 96), cfg, 4) == (64, 24)
    assert shard_shape("embedding.weight", (256, 64), cfg, 4) == (64, 64)
    assert shard_shape("final_norm.weight", (64,), cfg, 4) == (64,)


def test_qkv_rows_follow_the_query_heads():
    cfg = config(**PALM, num_kv_heads=2)
    hd, tp = cfg.kv_channels, 4
    # Label every row with its global row index so shards reveal which rows they took.
    full = torch.arange((8 + 2 * 2) * hd, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    q_end, k_end = 8 * hd, 10 * hd
    for rank in range(tp):
        shard = shard_param("layers.3.attn.qkv_proj.weight", full, cfg, rank, tp)[:, 0].long()
        kv_head = rank // kv_replicas(cfg, tp)  # ranks 0,1 -> KV head 0; ranks 2,3 -> KV head 1
        q = torch.arange(rank * 2 * hd, (rank + 1) * 2 * hd)
        k = torch.arange(q_end + kv_head * hd, q_end + (kv_head + 1) * hd)
        v = torch.arange(k_end + kv_head * hd, k_end + (kv_head + 1) * hd)
        assert torch.equal(shard, torch.cat((q, k, v)))


def test_gate_and_up_are_split_separately():
    cfg = config(**PALM, ffn_hidden_size=8)
    full = torch.arange(16, dtype=torch.float32)[:, None]  # rows: gate 0..7, up 8..15
    shard = shard_param("layers.0.mlp.gate_up_proj.weight", full, cfg, 1, 2)
    assert shard[:, 0].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_merge_rejects_diverged_replicas():
    cfg = config(**PALM, num_kv_heads=1)
    full = torch.randn((8 + 2) * cfg.kv_channels, 64)
    shards = [shard_param("layers.0.attn.qkv_proj.weight", full, cfg, r, 2) for r in range(2)]
    shards[1][-1, 0] += 1.0  # a KV row that both ranks hold
    with pytest.raises(ValueError, match="different copies"):
        merge_param("layers.0.attn.qkv_proj.weight", shards, cfg)
    norms = [torch.ones(64), torch.ones(64) * 2]
    with pytest.raises(ValueError, match="different copies"):
        merge_param("layers.0.norm.weight", norms, cfg)


def test_unknown_parameter_is_an_error():
    with pytest.raises(
        ValueError, match="no tensor-parallel split rule for parameter 'layers.0.attn.q_bias'"
    ):
        split_kind("layers.0.attn.q_bias")


@pytest.mark.parametrize("kv", [1, 2, 8])
def test_sharded_attention_partial_sums_equal_full(kv):
    """The split is the right one: summing each rank's o_proj partials reproduces the full attention."""
    torch.manual_seed(0)
    cfg = config(**PALM, num_kv_heads=kv)
    full = Attention(cfg)
    x = torch.randn(2, 16, 64)
    ref = full(x, AttentionInputs())
    tp, total = 4, torch.zeros_like(ref)
    for rank in range(tp):
        part = Attention(cfg)
        for name in ("qkv_proj", "o_proj"):
            weight = shard_param(f"attn.{name}.weight", getattr(full, name).weight.detach(), cfg, rank, tp)
            getattr(part, name).weight = torch.nn.Parameter(weight)
        part.num_heads, part.num_kv_heads = 8 // tp, max(kv // tp, 1)
        total += part(x, AttentionInputs())
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [PALM, MPT], ids=["swiglu", "gelu"])
def test_sharded_mlp_partial_sums_equal_full(family):
    torch.manual_seed(0)
    cfg = config(**family)
    full, x = MLP(cfg), torch.randn(2, 16, 64)
    total = torch.zeros(2, 16, 64)
    for rank in range(4):
        part = MLP(cfg)
        for name, param in full.named_parameters():
            module = part.get_submodule(name.rsplit(".", 1)[0])
            module.weight = torch.nn.Parameter(shard_param(f"mlp.{name}", param.detach(), cfg, rank, 4))
        total += part(x)
    torch.testing.assert_close(total, full(x), rtol=1e-5, atol=1e-6)
