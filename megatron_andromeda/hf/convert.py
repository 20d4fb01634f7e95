"""Exact conversion between Andromeda model state and Hugging Face causal-LM checkpoints.

The Hugging Face class follows from the ModelConfig:

    block       norm       MLP     positions             Hugging Face class
    parallel    layernorm  swiglu  rotary, interleaved   CohereForCausalLM
    parallel    layernorm  swiglu  rotary, half-split    StableLmForCausalLM (use_parallel_residual)
    sequential  layernorm  swiglu  rotary                StableLmForCausalLM
    sequential  rmsnorm    swiglu  rotary                LlamaForCausalLM
    sequential  layernorm  gelu    alibi                 MptForCausalLM

Weights are only renamed, split, concatenated or row-permuted, never rescaled, so a converted model
computes the same function. Rotary pairing is the one place where the layouts truly differ: our
interleaved heads rotate (x[2j], x[2j+1]) while StableLM and Llama rotate (x[j], x[j+d/2]). Pair j
turns by the same angle in both, so permuting the q and k rows of every head (`rotary_permutation`)
turns one convention into the other exactly. Parts Hugging Face has and we lack (StableLM's norm
biases) are written as zeros and must be zero on the way back; anything else refuses to convert
rather than dropping a tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch

from megatron_andromeda.config import ModelConfig
from megatron_andromeda.errors import UserError
from megatron_andromeda.models.attention import QKVLayout
from megatron_andromeda.models.rotary import rotary_permutation

StateDict = dict[str, torch.Tensor]


class ConversionError(UserError, ValueError):
    """A model or directory that cannot be converted exactly; the message says why and what to do."""

    label = "conversion error"


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Special token ids written into the Hugging Face configs (None: the tokenizer has none)."""

    eos: int | None = None
    pad: int | None = None

    def as_config(self) -> dict[str, int | None]:
        # bos is None on purpose: our data pipeline never prepends one, and the HF defaults
        # (Cohere's 5, Llama's 1) would make generate() prepend a token the model never saw.
        return {"bos_token_id": None, "eos_token_id": self.eos, "pad_token_id": self.pad}


# ------------------------------------------------------------------------------------ shared helpers
def _take(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"tensor {key!r} is missing from the state dict (have: {_few(sd)})")
    return sd.pop(key)


def _take_zero(sd: StateDict, key: str) -> None:
    """Consume a Hugging Face tensor we have no room for; only zeros can be dropped exactly."""
    t = _take(sd, key)
    if torch.count_nonzero(t):
        raise ConversionError(
            f"{key} is not zero; Andromeda has no biases, so it cannot be converted exactly"
        )


def _check_consumed(sd: StateDict, side: str) -> None:
    if sd:
        raise ConversionError(f"{len(sd)} {side} tensors have no counterpart and would be lost: {_few(sd)}")


def _few(sd: StateDict, n: int = 6) -> str:
    keys = sorted(sd)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _rotary_rows(
    w: torch.Tensor, heads: int, head_dim: int, src_interleaved: bool, dst_interleaved: bool
) -> torch.Tensor:
    """Reorder each head's rows of a q or k weight (heads * hd, D) from one rotary pairing to the other."""
    if src_interleaved == dst_interleaved:
        return w
    perm = rotary_permutation(head_dim)  # interleaved -> half-split
    if not src_interleaved:
        perm = torch.argsort(perm)  # half-split -> interleaved
    return w.view(heads, head_dim, -1)[:, perm].reshape(heads * head_dim, -1)


def _split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = QKVLayout.of(cfg)
    if w.shape[0] != layout.rows:
        raise ConversionError(
            f"qkv_proj has {w.shape[0]} rows, expected {layout.rows} for {cfg.num_heads} query and "
            f"{cfg.num_kv_heads} KV heads of {cfg.kv_channels}; does the checkpoint match its config?"
        )
    return tuple(part.clone() for part in layout.split(w))


def _layer_norms(cfg: ModelConfig) -> dict[str, str]:
    """Our norm names -> the Llama-family names, per block type."""
    if cfg.block == "parallel":
        return {"norm": "input_layernorm"}
    return {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}


def _rope_parameters(cfg: ModelConfig, **extra: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(cfg.rotary_base), **extra}


def _rope_theta(hf) -> float:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if params.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type={params['rope_type']!r} (RoPE scaling) has no Andromeda equivalent")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    return float(theta if theta is not None else hf.default_theta)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def _require_unit_logit_scale(cfg: ModelConfig, arch: str) -> None:
    _require(
        cfg.logit_scale == 1.0, f"{arch} has no logit scale; model.logit_scale={cfg.logit_scale} must be 1.0"
    )


# ------------------------------------------------------- Llama-like weights (Cohere, StableLM, Llama)
def _llama_like_to_hf(cfg: ModelConfig, sd: StateDict, *, interleaved: bool, norm_bias: bool) -> StateDict:
    """Our names -> `model.layers.{i}.self_attn.q_proj` style; `interleaved`: the target's rotary pairing."""
    sd = dict(sd)
    rows = lambda w, heads: _rotary_rows(w, heads, cfg.kv_channels, cfg.rotary_interleaved, interleaved)
    out = {"model.embed_tokens.weight": _take(sd, "embedding.weight")}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _layer_norms(cfg).items():
            out[dst + theirs + ".weight"] = w = _take(sd, src + ours + ".weight")
            if norm_bias:
                out[dst + theirs + ".bias"] = torch.zeros_like(w)
        q, k, v = _split_qkv(_take(sd, src + "attn.qkv_proj.weight"), cfg)
        out[dst + "self_attn.q_proj.weight"] = rows(q, cfg.num_heads)
        out[dst + "self_attn.k_proj.weight"] = rows(k, cfg.num_kv_heads)
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = _take(sd, src + "attn.o_proj.weight")
        gate, up = _take(sd, src + "mlp.gate_up_proj.weight").chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[dst + "mlp.down_proj.weight"] = _take(sd, src + "mlp.down_proj.weight")
    out["model.norm.weight"] = _take(sd, "final_norm.weight")
    if norm_bias:
        out["model.norm.bias"] = torch.zeros_like(out["model.norm.weight"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _take(sd, "lm_head.weight")
    _check_consumed(sd, "Andromeda")
    return out


def _llama_like_from_hf(cfg: ModelConfig, sd: StateDict, *, interleaved: bool, norm_bias: bool) -> StateDict:
    """The inverse of `_llama_like_to_hf`; `interleaved` is the source's rotary pairing."""
    sd = dict(sd)
    rows = lambda w, heads: _rotary_rows(w, heads, cfg.kv_channels, interleaved, cfg.rotary_interleaved)
    out = {"embedding.weight": _take(sd, "model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for ours, theirs in _layer_norms(cfg).items():
            out[dst + ours + ".weight"] = _take(sd, src + theirs + ".weight")
            if norm_bias:
                _take_zero(sd, src + theirs + ".bias")
        q = rows(_take(sd, src + "self_attn.q_proj.weight"), cfg.num_heads)
        k = rows(_take(sd, src + "self_attn.k_proj.weight"), cfg.num_kv_heads)
        out[dst + "attn.qkv_proj.weight"] = QKVLayout.join(q, k, _take(sd, src + "self_attn.v_proj.weight"))
        out[dst + "attn.o_proj.weight"] = _take(sd, src + "self_attn.o_proj.weight")
        gate, up = _take(sd, src + "mlp.gate_proj.weight"), _take(sd, src + "mlp.up_proj.weight")
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat((gate, up))
        out[dst + "mlp.down_proj.weight"] = _take(sd, src + "mlp.down_proj.weight")
        sd.pop(src + "self_attn.rotary_emb.inv_freq", None)  # a buffer some older exports saved
    out["final_norm.weight"] = _take(sd, "model.norm.weight")
    if norm_bias:
        _take_zero(sd, "model.norm.bias")
    _take_head(cfg, sd, out, "lm_head.weight")
    _check_consumed(sd, "Hugging Face")
    return out


def _take_head(cfg: ModelConfig, sd: StateDict, out: StateDict, key: str) -> None:
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _take(sd, key)
    elif key in sd:  # some exports save the tied head too; it must be the embedding itself
        head = sd.pop(key)
        _require(torch.equal(head, out["embedding.weight"]), f"{key} differs from the tied input embedding")


# ----------------------------------------------------------------------------------- MPT weights
_MPT_LAYER = {  # ours -> theirs, inside one block
    "norm1.weight": "norm_1.weight",
    "attn.qkv_proj.weight": "attn.Wqkv.weight",  # same fused [q; k; v] row layout
    "attn.o_proj.weight": "attn.out_proj.weight",
    "norm2.weight": "norm_2.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
}


def _mpt_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"embedding.weight": "transformer.wte.weight", "final_norm.weight": "transformer.norm_f.weight"}
    for i in range(cfg.num_layers):
        names.update(
            {f"layers.{i}.{ours}": f"transformer.blocks.{i}.{theirs}" for ours, theirs in _MPT_LAYER.items()}
        )
    return names


def _mpt_to_hf(cfg: ModelConfig, sd: StateDict) -> StateDict:
    sd = dict(sd)
    out = {theirs: _take(sd, ours) for ours, theirs in _mpt_names(cfg).items()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _take(sd, "lm_head.weight")
    _check_consumed(sd, "Andromeda")
    return out


def _mpt_from_hf(cfg: ModelConfig, hf_sd: StateDict) -> StateDict:
    sd = dict(hf_sd)
    out = {ours: _take(sd, theirs) for ours, theirs in _mpt_names(cfg).items()}
    _take_head(cfg, sd, out, "lm_head.weight")
    _check_consumed(sd, "Hugging Face")
    return out


# ----------------------------------------------------------------------------------- configs, per family
def _llama_like_kwargs(cfg: ModelConfig, tokens: TokenIds) -> dict:
    """transformers config fields Cohere, StableLM and Llama name alike."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_length,
        tie_word_embeddings=cfg.tie_embeddings,
        **tokens.as_config(),
    )


def _cohere_config(cfg: ModelConfig, tokens: TokenIds):
    from transformers import CohereConfig

    hf = CohereConfig(
        **_llama_like_kwargs(cfg, tokens),
        head_dim=cfg.kv_channels,
        layer_norm_eps=cfg.norm_eps,
        logit_scale=cfg.logit_scale,
        rope_parameters=_rope_parameters(cfg),
        use_qk_norm=False,
        attention_bias=False,
    )
    hf.rope_theta = float(cfg.rotary_base)  # the pre-5.0 field: CohereConfig's default theta is not ours
    return hf


def _stablelm_config(cfg: ModelConfig, tokens: TokenIds):
    from transformers import StableLmConfig

    _require_unit_logit_scale(cfg, "StableLM")
    _require(
        cfg.kv_channels * cfg.num_heads == cfg.hidden_size,
        f"StableLM needs head_dim * num_heads == hidden_size, got model.head_dim={cfg.kv_channels}",
    )
    hf = StableLmConfig(
        **_llama_like_kwargs(cfg, tokens),
        layer_norm_eps=cfg.norm_eps,
        use_parallel_residual=cfg.block == "parallel",
        rope_parameters=_rope_parameters(cfg, partial_rotary_factor=1.0),
        use_qkv_bias=False,
        qk_layernorm=False,
    )
    hf.rope_theta, hf.partial_rotary_factor = float(cfg.rotary_base), 1.0  # pre-5.0 fields (default 0.25!)
    return hf


def _llama_config(cfg: ModelConfig, tokens: TokenIds):
    from transformers import LlamaConfig

    _require_unit_logit_scale(cfg, "Llama")
    hf = LlamaConfig(
        **_llama_like_kwargs(cfg, tokens),
        head_dim=cfg.kv_channels,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg),
        attention_bias=False,
        mlp_bias=False,
    )
    hf.rope_theta = float(cfg.rotary_base)
    return hf


def _mpt_config(cfg: ModelConfig, tokens: TokenIds):
    from transformers import MptConfig

    _require_unit_logit_scale(cfg, "MPT")
    _require(
        cfg.num_kv_heads == cfg.num_heads,
        f"MPT has no grouped-query attention: model.num_kv_heads={cfg.num_kv_heads} must equal num_heads",
    )
    _require(
        cfg.kv_channels * cfg.num_heads == cfg.hidden_size, "MPT needs head_dim * num_heads == hidden_size"
    )
    _require(cfg.ffn_size == 4 * cfg.hidden_size, f"MPT's MLP is 4 * hidden_size wide, got {cfg.ffn_size}")
    return MptConfig(
        d_model=cfg.hidden_size,
        n_heads=cfg.num_heads,
        n_layers=cfg.num_layers,
        expansion_ratio=4,
        max_seq_len=cfg.max_seq_length,
        vocab_size=cfg.vocab_size,
        layer_norm_epsilon=cfg.norm_eps,
        learned_pos_emb=False,
        no_bias=True,
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=True,
        attn_config={"alibi": True, "alibi_bias_max": 8},
        **tokens.as_config(),
    )


def _model_config(hf, **fields) -> ModelConfig:
    """A rotary ModelConfig from the fields every Llama-like transformers config shares."""
    return ModelConfig(
        name=f"hf-{hf.model_type}",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        position_embedding="rotary",
        rotary_base=_rope_theta(hf),
        max_seq_length=hf.max_position_embeddings,
        tie_embeddings=hf.tie_word_embeddings,
        **fields,
    )


def _cohere_model_config(hf) -> ModelConfig:
    _require(hf.hidden_act == "silu", f"Cohere hidden_act={hf.hidden_act!r}: only silu (SwiGLU) converts")
    _require(
        not hf.use_qk_norm and not hf.attention_bias, "Cohere with qk-norm or attention biases won't convert"
    )
    scale = float(hf.logit_scale if hf.logit_scale is not None else 1.0)
    return _model_config(
        hf, block="parallel", norm="layernorm", activation="swiglu", rotary_interleaved=True,
        norm_eps=hf.layer_norm_eps, logit_scale=scale,
    )  # fmt: skip


def _stablelm_model_config(hf) -> ModelConfig:
    factor = (hf.rope_parameters or {}).get(
        "partial_rotary_factor", getattr(hf, "partial_rotary_factor", 0.25)
    )
    _require(factor == 1.0, f"StableLM partial_rotary_factor={factor}: only 1.0 (full rotary) converts")
    _require(hf.hidden_act == "silu", f"StableLM hidden_act={hf.hidden_act!r}: only silu (SwiGLU) converts")
    _require(
        not hf.use_qkv_bias and not hf.qk_layernorm, "StableLM with qkv biases or qk-layernorm won't convert"
    )
    block = "parallel" if hf.use_parallel_residual else "sequential"
    return _model_config(
        hf, block=block, norm="layernorm", activation="swiglu", rotary_interleaved=False,
        norm_eps=hf.layer_norm_eps,
    )  # fmt: skip


def _llama_model_config(hf) -> ModelConfig:
    _require(hf.hidden_act == "silu", f"Llama hidden_act={hf.hidden_act!r}: only silu (SwiGLU) converts")
    _require(not hf.attention_bias and not hf.mlp_bias, "Llama with attention or MLP biases won't convert")
    return _model_config(
        hf, block="sequential", norm="rmsnorm", activation="swiglu", rotary_interleaved=False,
        norm_eps=hf.rms_norm_eps,
    )  # fmt: skip


def _mpt_model_config(hf) -> ModelConfig:
    attn = hf.attn_config
    _require(attn.alibi and attn.alibi_bias_max == 8, "MPT converts only with ALiBi and alibi_bias_max=8")
    _require(attn.attn_type == "multihead_attention", f"MPT attn_type={attn.attn_type!r} won't convert")
    unsupported = attn.clip_qkv is not None or attn.qk_ln or attn.softmax_scale is not None or attn.prefix_lm
    _require(not unsupported, "MPT with clip_qkv, qk_ln, softmax_scale or prefix_lm won't convert")
    _require(hf.logit_scale in (None, 1.0), f"MPT logit_scale={hf.logit_scale!r} won't convert")
    _require(hf.expansion_ratio == 4, f"MPT expansion_ratio={hf.expansion_ratio}: transformers' MPT needs 4")
    return ModelConfig(
        name="hf-mpt", vocab_size=hf.vocab_size, hidden_size=hf.d_model, num_layers=hf.n_layers,
        num_heads=hf.n_heads, num_kv_heads=hf.n_heads, block="sequential", norm="layernorm",
        activation="gelu", position_embedding="alibi", max_seq_length=hf.max_seq_len,
        tie_embeddings=hf.tie_word_embeddings, norm_eps=hf.layer_norm_epsilon,
    )  # fmt: skip


# ----------------------------------------------------------------------------------- the families
@dataclasses.dataclass(frozen=True)
class _Family:
    architecture: str
    make_config: Callable  # (ModelConfig, TokenIds) -> transformers config
    read_config: Callable  # transformers config -> ModelConfig
    to_hf: Callable[[ModelConfig, StateDict], StateDict]
    from_hf: Callable[[ModelConfig, StateDict], StateDict]


def _llama_like(architecture: str, make, read, **layout: bool) -> _Family:
    """`layout`: the family's rotary pairing (`interleaved`) and whether its norms carry a `norm_bias`."""
    return _Family(
        architecture, make, read, partial(_llama_like_to_hf, **layout), partial(_llama_like_from_hf, **layout)
    )


FAMILIES: dict[str, _Family] = {  # keyed by transformers' model_type
    "cohere": _llama_like(
        "CohereForCausalLM", _cohere_config, _cohere_model_config, interleaved=True, norm_bias=False
    ),
    "stablelm": _llama_like(
        "StableLmForCausalLM", _stablelm_config, _stablelm_model_config, interleaved=False, norm_bias=True
    ),
    "llama": _llama_like(
        "LlamaForCausalLM", _llama_config, _llama_model_config, interleaved=False, norm_bias=False
    ),
    "mpt": _Family("MptForCausalLM", _mpt_config, _mpt_model_config, _mpt_to_hf, _mpt_from_hf),
}


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers `model_type` an Andromeda model exports as (see the table in the module docstring)."""
    shape = (cfg.block, cfg.norm, cfg.activation, cfg.position_embedding)
    if shape == ("parallel", "layernorm", "swiglu", "rotary"):
        return "cohere" if cfg.rotary_interleaved else "stablelm"
    if shape == ("sequential", "layernorm", "swiglu", "rotary"):
        return "stablelm"
    if shape == ("sequential", "rmsnorm", "swiglu", "rotary"):
        return "llama"
    if shape == ("sequential", "layernorm", "gelu", "alibi"):
        return "mpt"
    raise ConversionError(
        f"no Hugging Face architecture matches model.block={cfg.block}, model.norm={cfg.norm}, "
        f"model.activation={cfg.activation}, model.position_embedding={cfg.position_embedding}; supported: "
        "parallel+layernorm+swiglu+rotary (Cohere, StableLM), sequential+layernorm+swiglu+rotary (StableLM), "
        "sequential+rmsnorm+swiglu+rotary (Llama), sequential+layernorm+gelu+alibi (MPT)"
    )


def to_hf(cfg: ModelConfig, state_dict: StateDict, tokens: TokenIds = TokenIds()):
    """(transformers config, Hugging Face state dict) for an Andromeda model; raises ConversionError."""
    family = FAMILIES[hf_model_type(cfg)]
    try:
        hf_config = family.make_config(cfg, tokens)
    except ConversionError:
        raise
    except _config_rejections() as e:  # transformers' own validation of a shape it does not support
        raise ConversionError(
            f"transformers' {family.architecture} config rejects this model "
            f"({_one_line(e)}); model.hidden_size={cfg.hidden_size}, model.num_heads={cfg.num_heads}, "
            f"model.head_dim={cfg.kv_channels}, model.num_kv_heads={cfg.num_kv_heads}"
        ) from e
    hf_config.architectures = [family.architecture]
    return hf_config, family.to_hf(cfg, state_dict)


def _config_rejections() -> tuple[type[BaseException], ...]:
    """The exceptions a transformers config raises for values it refuses (ConversionError excluded)."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates through it
    except ImportError:
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_hf(hf_config, hf_state_dict: StateDict) -> tuple[ModelConfig, StateDict]:
    """(ModelConfig, Andromeda state dict) for a transformers config and its weights."""
    family = FAMILIES.get(hf_config.model_type)
    if family is None:
        raise ConversionError(
            f"Hugging Face model_type={hf_config.model_type!r} does not convert; "
            f"supported: {', '.join(FAMILIES)}"
        )
    cfg = family.read_config(hf_config)
    cfg.validate()
    state = family.from_hf(cfg, hf_state_dict)
    _check_fits(cfg, state)
    return cfg, state


def _check_fits(cfg: ModelConfig, state: StateDict) -> None:
    """Names and shapes against a GPTModel built on the meta device (no memory, no init cost)."""
    from megatron_andromeda.models import GPTModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPTModel(cfg).state_dict().items()}
    wrong = [
        f"{k}: {tuple(v.shape)} vs {expected.get(k)}" for k, v in state.items() if expected.get(k) != v.shape
    ]
    wrong += [f"{k} missing" for k in expected.keys() - state.keys()]
    _require(not wrong, f"the converted weights do not fit the model their config describes: {wrong[:6]}")
