"""The model's shape: architecture only, nothing about devices or parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_andromeda.errors import ConfigError
from megatron_andromeda.fields import check_fields, option


@dataclass
class ModelConfig:
    """Architecture only: nothing here knows about devices or parallelism."""

    name: str = option("custom", "a label (a preset's name when built from one)")
    vocab_size: int = option(50304, "rows of the embedding; >= the tokenizer's vocabulary", min=1)
    hidden_size: int = option(768, "width of the residual stream", min=1)
    num_layers: int = option(12, "transformer blocks", min=1)
    num_heads: int = option(8, "query heads", min=1)
    head_dim: int | None = option(None, "width of each head; default hidden_size // num_heads", min=1)
    num_kv_heads: int = option(1, "key/value heads: 1 multi-query, num_heads multi-head", min=1)
    ffn_hidden_size: int | None = option(
        None, "MLP width (per SwiGLU branch); default 4 * hidden_size", min=1
    )
    block: str = option(
        "parallel", "parallel (PaLM: attention + MLP from one norm) or sequential (pre-norm)",
        choices=("parallel", "sequential"),
    )  # fmt: skip
    norm: str = option("layernorm", "layernorm (no bias) or rmsnorm", choices=("layernorm", "rmsnorm"))
    activation: str = option("swiglu", "MLP activation", choices=("swiglu", "gelu"))
    position_embedding: str = option("rotary", "positions", choices=("rotary", "alibi"))
    rotary_base: float = option(10000.0, "rotary frequency base (theta)", above=1.0)
    rotary_interleaved: bool = option(
        True, "rotate pairs (0,1),(2,3)... (GPT-J/Cohere); false: (i, i+d/2) (NeoX/Llama)"
    )
    max_seq_length: int = option(2048, "longest sequence the rotary tables cover", min=1)
    tie_embeddings: bool = option(True, "the output head shares the embedding matrix")
    z_loss: float = option(1e-4, "PaLM's auxiliary z_loss * logsumexp(logits)^2; 0 disables", min=0.0)
    norm_eps: float = option(1e-5, "epsilon of the norms", above=0.0)
    init_std: float = option(0.02, "standard deviation of the initial weights", above=0.0)
    dropout: float = option(
        0.0, "dropout on attention probabilities and residual branches", min=0.0, below=1.0
    )
    logit_scale: float = option(1.0, "logits are multiplied by this before the softmax", above=0.0)

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    def validate(self) -> None:
        check_fields(self, "model")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads="
                f"{self.num_kv_heads} (each KV head serves the same number of query heads)"
            )
        if self.position_embedding == "rotary" and self.kv_channels % 2:
            raise ConfigError(f"rotary embeddings need an even head dimension, got {self.kv_channels}")
