"""One tokenizer interface over Hugging Face `tokenizer.json` files and SentencePiece `.model` files.

`load_tokenizer(path)` picks the backend from the file: a `.model` file is SentencePiece, anything
else is read with the `tokenizers` library (GPT-NeoX, Falcon, Llama-3 and any other fast tokenizer
saved as `tokenizer.json`). Encoding never adds special tokens: the data pipeline appends the
end-of-document token itself, so the same ids come out whatever the tokenizer's post-processor says.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

# The end-of-document token is the first of these names present in the vocabulary; SentencePiece
# models use their declared eos id first. Order matters: "<|endoftext|>" (GPT-2/NeoX/Falcon) wins
# over "</s>" when a vocabulary has both.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]", "<|endofpad|>")


class Tokenizer(ABC):
    """Text <-> token ids, plus the few facts the data pipeline and model need."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added special tokens included."""

    @property
    def eod_id(self) -> int:
        """End-of-document id: the first of `EOD_CANDIDATES` in the vocabulary."""
        for name in EOD_CANDIDATES:
            token_id = self.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"{self.path}: no end-of-document token found (looked for {', '.join(EOD_CANDIDATES)}); "
            "add one as a special token, e.g. retrain with tools/train_tokenizer.py"
        )

    @property
    def pad_id(self) -> int | None:
        for name in PAD_CANDIDATES:
            token_id = self.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` fast tokenizer loaded from `tokenizer.json`."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Added tokens can sit above the base vocabulary without being counted by get_vocab_size.
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes on the library's own Rust thread pool (RAYON_NUM_THREADS caps it)."""
        return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.Encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.PieceToId(token)
        # PieceToId maps unknown pieces to unk; only a real match counts.
        return token_id if self._sp.IdToPiece(token_id) == token else None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod_id(self) -> int:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else super().eod_id

    @property
    def pad_id(self) -> int | None:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else super().pad_id


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` (Hugging Face) or `*.model` (SentencePiece); a directory means its
    `tokenizer.json` or `tokenizer.model`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file not found: {path}; point data.tokenizer at a tokenizer.json or a "
            "SentencePiece .model, or make one with tools/train_tokenizer.py"
        )
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
