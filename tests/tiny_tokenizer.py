"""What the tests share to make data: a tiny byte-level BPE tokenizer and token datasets.

The tokenizer is GPT-NeoX style (ByteLevel pre-tokenizer and decoder, `<|endoftext|>` = 0 and, by
default, `<|padding|>` = 1), trained in a test on the texts it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ("<|endoftext|>", "<|padding|>")
FOX = "the quick brown fox jumps over the lazy dog"


def train_tiny_tokenizer(
    path: str | Path, texts: Sequence[str], vocab_size: int = 300, special_tokens: Sequence[str] = SPECIAL
) -> str:
    """Train on `texts`, save as `path` (a tokenizer.json) and return the path as a string."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.save(str(path))
    return str(path)


def write_random_documents(
    prefix: str | Path, num_docs: int, low: int, high: int, seed: int = 0, eod: int = 0
) -> None:
    """A .bin/.idx dataset of `num_docs` documents of 5-39 random ids in [low, high), each ending in `eod`."""
    from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_docs):
            writer.add_document(np.append(rng.integers(low, high, rng.integers(5, 40)), eod))
