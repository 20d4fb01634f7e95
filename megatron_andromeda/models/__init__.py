"""Model math only: no torch.distributed, no devices, no optimizers."""

from megatron_andromeda.models.attention import KVCache
from megatron_andromeda.models.gpt import GPTModel, language_model_loss

__all__ = ["GPTModel", "KVCache", "language_model_loss"]
