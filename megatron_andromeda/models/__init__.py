"""Model math only: no torch.distributed, no devices, no optimizers."""

from megatron_andromeda.models.attention import KVCache
from megatron_andromeda.models.gpt import GPTModel, language_model_loss
from megatron_andromeda.models.vocab import mask_padding_logits, resize_vocabulary

__all__ = ["GPTModel", "KVCache", "language_model_loss", "mask_padding_logits", "resize_vocabulary"]
