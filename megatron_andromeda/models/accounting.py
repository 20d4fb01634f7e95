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


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes for model state in mixed precision (bf16 weights, fp32 grads, fp32 master + Adam)."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_states

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def training_memory(
    cfg: ModelConfig, data_parallel: int = 1, distributed_optimizer: bool = False
) -> TrainingMemory:
    """Megatron's accounting: 2 (bf16 weight) + 4 (fp32 grad) + 4 (fp32 master) + 8 (Adam m, v) bytes.

    With the distributed optimizer (ZeRO-1) master weights and Adam states are split over the data
    group; weights and gradient buffers are not.
    """
    n = count_parameters(cfg).total
    shard = data_parallel if distributed_optimizer else 1
    return TrainingMemory(
        weights=2 * n, gradients=4 * n, master_weights=4 * n // shard, optimizer_states=8 * n // shard
    )
