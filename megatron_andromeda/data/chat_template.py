"""The chat template: a conversation rendered to token ids plus a loss mask over them.

    <|system|>\\n{system}\\n<|user|>\\n{question}\\n<|assistant|>\\n{reply}<|endoftext|><|user|>\\n...

Only the assistant's replies and the end-of-document token that closes each reply are trained
(mask 1); the role markers, the system prompt and the user's turns are context (mask 0). Ending a
reply with the tokenizer's end-of-document token teaches the model when to stop, and generation
stops on the same token.

Each piece of text is tokenized on its own and the ids are concatenated, so the mask boundaries
fall exactly between pieces and a prompt built for generation (`encode_prompt`) tokenizes the same
way as the training data did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.data.chat_formats import Conversation
from megatron_andromeda.data.tokenizer import Tokenizer

_END = None  # a segment holding the end-of-document token instead of text

Segment = tuple[str | None, bool]  # (text, or _END for the end token; trained?)


@dataclass(frozen=True)
class ChatTemplate:
    """Role markers as plain text, so that any tokenizer can render them (no new special tokens)."""

    system: str = "<|system|>\n"
    user: str = "<|user|>\n"
    assistant: str = "<|assistant|>\n"
    turn_end: str = "\n"  # closes system and user turns; assistant turns end with the end token

    def segments(self, conversation: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        """The pieces of the rendered conversation, each marked trained or not."""
        pieces: list[Segment] = []
        for message in conversation:
            role, content = message["role"], message["content"]
            if role == "assistant":
                pieces += [(self.assistant, False), (content, True), (_END, True)]
            elif role in ("system", "user"):
                marker = self.system if role == "system" else self.user
                pieces.append((marker + content + self.turn_end, False))
            else:
                raise ValueError(f"unknown role {role!r}; expected system, user or assistant")
        if add_generation_prompt:
            pieces.append((self.assistant, False))
        return pieces

    def render(self, conversation: Conversation, end_text: str = "<|endoftext|>") -> str:
        """The conversation as the model sees it, with `end_text` standing for the end token."""
        return "".join(end_text if text is _END else text for text, _ in self.segments(conversation))

    def encode(self, conversation: Conversation, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and loss mask (uint8, 1 = trained) of one conversation."""
        return self.encode_many([conversation], tokenizer)[0]

    def encode_many(
        self, conversations: Sequence[Conversation], tokenizer: Tokenizer
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`encode` for many conversations with a single batched call into the tokenizer."""
        per_conv = [self.segments(c) for c in conversations]
        texts = [text for segs in per_conv for text, _ in segs if text is not _END]
        encoded = iter(tokenizer.encode_batch(texts))
        eod = tokenizer.eod_id
        out = []
        for segs in per_conv:
            ids: list[int] = []
            mask: list[int] = []
            for text, trained in segs:
                piece = [eod] if text is _END else next(encoded)
                ids += piece
                mask += [int(trained)] * len(piece)
            out.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
        return out

    def encode_prompt(self, conversation: Conversation, tokenizer: Tokenizer) -> list[int]:
        """Ids that end with the assistant marker, for the model to write the next reply."""
        ids: list[int] = []
        for text, _ in self.segments(conversation, add_generation_prompt=True):
            ids += [tokenizer.eod_id] if text is _END else tokenizer.encode(text)
        return ids
