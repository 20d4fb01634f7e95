"""Supervised fine-tuning data: public chat formats -> one conversation format -> masked, packed samples.

`formats` reads oasst1, Dolly, Alpaca, ShareGPT and Anthropic HH records (and our own `messages`
records) into `[{"role": ..., "content": ...}]`; `template` renders a conversation to token ids
with a loss mask that trains only the assistant's replies; `dataset` stores ids and mask as two
Megatron indexed datasets and packs conversations into fixed-length samples.
"""

from megatron_andromeda.sft.formats import FORMATS, Conversation, FormatError, ReadReport, read_conversations
from megatron_andromeda.sft.template import ChatTemplate

__all__ = ["FORMATS", "ChatTemplate", "Conversation", "FormatError", "ReadReport", "read_conversations"]
