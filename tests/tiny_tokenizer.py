"""A tiny byte-level BPE tokenizer (GPT-NeoX style, with <|endoftext|>) trained in a test."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def train_tiny_tokenizer(path: Path, texts: list[str], vocab_size: int = 300) -> str:
    """Train on `texts`, save as `path` (a tokenizer.json) and return the path as a string."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return str(path)
