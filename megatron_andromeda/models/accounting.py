"""Closed-form parameter counts, training FLOPs and memory for a ModelConfig (no tensors built)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_andromeda.models.config import ModelConfig


@dataclass(frozen=True)
class ParameterCount:
    embedding: int  # input embedding (V x D)
    per_layer: int
    layers: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.lm_head

    @property
    def non_embedding(self) -> int:
        return self.layers + self.final_norm


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    d, hd = cfg.hidden_size, cfg.kv_channels
    attn = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
    mlp_matrices = 3 if cfg.activation == "swiglu" else 2
    mlp = mlp_matrices * d * cfg.ffn_size
    norms = d if cfg.block == "parallel" else 2 * d
    per_layer = attn + mlp + norms
    return ParameterCount(
        embedding=cfg.vocab_size * d,
        per_layer=per_layer,
        layers=per_layer * cfg.num_layers,
        final_norm=d,
        lm_head=0 if cfg.tie_embeddings else cfg.vocab_size * d,
    )


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """PaLM's estimate (appendix B): 6N + 12 L H Q T per trained token.

    N counts the weights every token multiplies: all non-embedding matrices plus the output head
    (shared with the embedding or not; the embedding lookup itself costs no FLOPs). The second term
    is the attention score and value products (forward + backward) at sequence length T, counted for
    the full square as PaLM and Megatron do, without halving for causality.
    """
    counts = count_parameters(cfg)
    matmul_params = counts.non_embedding + cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.kv_channels * seq_length
    return 6.0 * matmul_params + attention


WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes for model state: weights in the run's precision, fp32 gradients, masters and Adam."""

    precision: str  # the weights' dtype: fp32, bf16 or fp16
    weights: int
    gradients: int
    master_weights: int  # 0 in fp32: the weights are their own masters
    optimizer_states: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_states

    def as_dict(self) -> dict[str, int]:
        sizes = {k: v for k, v in asdict(self).items() if k != "precision"}
        return {**sizes, "total": self.total}


def training_memory(
    cfg: ModelConfig,
    data_parallel: int = 1,
    distributed_optimizer: bool = False,
    precision: str = "bf16",
) -> TrainingMemory:
    """Megatron's accounting: 2 (bf16 weight) + 4 (fp32 grad) + 4 (fp32 master) + 8 (Adam m, v) bytes.

    An fp32 run has 4-byte weights and no separate master copy (the optimizer updates the weights
    themselves, as parallel/mixed_precision.py does), so 16 bytes per parameter as well. With the
    distributed optimizer (ZeRO-1) master weights and Adam states are split over the data group;
    weights and gradient buffers are not.
    """
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(WEIGHT_BYTES)}")
    n = count_parameters(cfg).total
    shard = data_parallel if distributed_optimizer else 1
    master = 0 if precision == "fp32" else 4 * n // shard
    return TrainingMemory(
        precision=precision,
        weights=WEIGHT_BYTES[precision] * n,
        gradients=4 * n,
        master_weights=master,
        optimizer_states=8 * n // shard,
    )
