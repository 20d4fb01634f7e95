"""Named model shapes, usable as `model=NAME` in a config file or on the command line.

`palm-*` follow the dataset-strategy table exactly (vocab 50304, 8 heads of 128, one KV head,
SwiGLU with 4x expansion). `andromeda-*` are the project's 100M / 500M / 1B models in the same
spirit (head dim 128 where the width allows, one KV head, parallel block); `mpt-*` are MPT-style
sequential blocks with ALiBi and a GELU MLP.
"""

from __future__ import annotations

import dataclasses

from megatron_andromeda.errors import ConfigError
from megatron_andromeda.models.config import ModelConfig

_PALM = dict(
    vocab_size=50304,
    num_kv_heads=1,
    block="parallel",
    norm="layernorm",
    activation="swiglu",
    position_embedding="rotary",
    tie_embeddings=True,
)
_MPT = dict(
    vocab_size=50432,
    block="sequential",
    norm="layernorm",
    activation="gelu",
    position_embedding="alibi",
    tie_embeddings=True,
    z_loss=0.0,
    max_seq_length=2048,
)

PRESETS: dict[str, ModelConfig] = {
    # The seed's PaLM table: dim, depth, 8 heads of 128, one KV head.
    "palm-150m": ModelConfig(
        name="palm-150m", hidden_size=768, num_layers=12, num_heads=8, head_dim=128, **_PALM
    ),
    "palm-410m": ModelConfig(
        name="palm-410m", hidden_size=1024, num_layers=24, num_heads=8, head_dim=128, **_PALM
    ),
    "palm-1b": ModelConfig(
        name="palm-1b", hidden_size=2048, num_layers=16, num_heads=8, head_dim=128, **_PALM
    ),
    # Project models: nominal 100M / 500M / 1B within 10%.
    "andromeda-100m": ModelConfig(
        name="andromeda-100m", hidden_size=768, num_layers=8, num_heads=8, head_dim=96, **_PALM
    ),
    "andromeda-500m": ModelConfig(
        name="andromeda-500m", hidden_size=1024, num_layers=32, num_heads=8, head_dim=128, **_PALM
    ),
    "andromeda-1b": ModelConfig(
        name="andromeda-1b", hidden_size=2048, num_layers=16, num_heads=16, head_dim=128, **_PALM
    ),
    # MPT family: the seed's MPT-7B table, and MPT-1B (mosaicml/mpt-1b-redpajama-200b's shape).
    "mpt-1b": ModelConfig(
        name="mpt-1b", hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, **_MPT
    ),
    "mpt-7b": ModelConfig(
        name="mpt-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, **_MPT
    ),
}

NOMINAL_PARAMETERS = {"andromeda-100m": 100e6, "andromeda-500m": 500e6, "andromeda-1b": 1e9}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset (callers may modify it)."""
    if name not in PRESETS:
        import difflib

        near = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown model preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])
