"""One tokenizer interface over Hugging Face `tokenizer.json` and SentencePiece `.model` files, with
a choice of encoding backend made here and nowhere else.

Backends (`TOKENIZER_BACKENDS`, the `--tokenizer-backend` flag of tools/preprocess_data.py and the
`data.tokenizer_backend` config field):

- `tokenizers`: the Hugging Face library reads `tokenizer.json` (GPT-NeoX, Falcon, Llama-3, ...);
- `sentencepiece`: the SentencePiece library reads `.model` files;
- `gigatoken`: the optional `gigatoken` package (`pip install 'megatron_andromeda[fast]'`) encodes
  the same files several times faster (Rust, GIL released, its own thread pool). It only encodes:
  the vocabulary, special-token ids and decoding still come from the file's own library (the
  "reference"), so the end-of-document id can never drift from the ids;
- `auto`: gigatoken when it is installed, loads the file and agrees with the reference on the probe
  texts below, else the reference library. `load_tokenizer(path)` without a backend keeps the
  reference library.

Identity is checked, not assumed: before gigatoken is used, both backends encode `probe_texts`
(empty and whitespace-only text, every special token inside text, combining characters, emoji, very
long words, ...) and the caller's sample documents. Under `auto`, a difference on the probes means
gigatoken cannot reproduce this tokenizer (SentencePiece models usually land here: gigatoken
matches special-token strings inside text, sentencepiece does not) and the reference is used, with
the reason in `Tokenizer.selection`. A difference on the caller's documents, or on anything under an
explicit `gigatoken`, raises `TokenizerMismatchError` naming the text and both id sequences.

Encoding never adds special tokens: the data pipeline appends the end-of-document token itself, so
the same ids come out whatever the tokenizer's post-processor says. Special-token strings inside
text are matched as the reference library matches them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.errors import UserError

# The end-of-document token is the first of these names present in the vocabulary; SentencePiece
# models use their declared eos id first. Order matters: "<|endoftext|>" (GPT-2/NeoX/Falcon) wins
# over "</s>" when a vocabulary has both.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]", "<|endofpad|>")

TOKENIZER_BACKENDS = ("auto", "gigatoken", "tokenizers", "sentencepiece")
INSTALL_FAST = "pip install 'megatron_andromeda[fast]' (or pip install gigatoken)"


SEPARATOR = b"\xff"  # never inside UTF-8 text


class Utf8Batch:
    """Texts as UTF-8, back to back in one buffer with 0xFF (a byte UTF-8 never holds) after each:
    the layout gigatoken splits in parallel without a Python object per text."""

    def __init__(self, buffer: bytes, lengths: np.ndarray, *, valid_utf8: bool = False) -> None:
        self.buffer = buffer
        # True when the maker guarantees UTF-8 (the C++ scanner validates it, str.encode makes it):
        # then no 0xFF hides inside a text and encode_flat skips its scan of the whole buffer.
        self.valid_utf8 = valid_utf8
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (K,) bytes per text
        self.starts = np.cumsum(self.lengths + 1) - self.lengths - 1  # (K,)
        if len(buffer) != int(self.lengths.sum()) + self.lengths.size:
            raise ValueError("Utf8Batch: the buffer does not match the lengths")

    @classmethod
    def from_texts(cls, texts: Sequence[bytes], *, valid_utf8: bool = False) -> Utf8Batch:
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return cls(SEPARATOR.join([*texts, b""]) if len(texts) else b"", lengths, valid_utf8=valid_utf8)

    def __len__(self) -> int:
        return int(self.lengths.size)

    def __getitem__(self, i: int) -> bytes:
        start = int(self.starts[i])
        return self.buffer[start : start + int(self.lengths[i])]

    def to_list(self) -> list[bytes]:
        return [self.buffer[s : s + n] for s, n in zip(self.starts.tolist(), self.lengths.tolist())]


Texts = Sequence[str] | Sequence[bytes] | Utf8Batch


class TokenizerBackendError(ValueError):
    """A backend that cannot serve this tokenizer; the message names the file or package and what to do."""


class TokenizerMismatchError(TokenizerBackendError):
    """gigatoken and the reference library give different ids for a text."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used (malformed, or missing a token the pipeline needs)."""

    label = "tokenizer error"


class TokenizerNotFoundError(UserError, FileNotFoundError):
    """No tokenizer file at the path given (a FileNotFoundError, so `except OSError` still sees it)."""

    label = "tokenizer error"


class Tokenizer(ABC):
    """Text <-> token ids, plus the few facts the data pipeline and model need."""

    backend = "?"  # the TOKENIZER_BACKENDS name of the library that encodes

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self.selection = self.backend  # which backend runs and why (set by load_tokenizer)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Texts) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back (integer array) and the number of ids of each text (int64):
        the shape the data pipeline writes, without a Python list per document where avoidable.
        Texts may be `str`, UTF-8 `bytes` or a `Utf8Batch` (the same ids either way)."""
        if isinstance(texts, Utf8Batch):
            texts = texts.to_list()
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        ids = self.encode_batch(texts) if texts else []
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abstractmethod
    def special_strings(self) -> list[str]:
        """Strings the tokenizer may treat specially inside text (added / control / user pieces)."""

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
        raise TokenizerError(
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

    backend = "tokenizers"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
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

    def special_strings(self) -> list[str]:
        added = self._tok.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added)]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file."""

    backend = "sentencepiece"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e

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

    def special_strings(self) -> list[str]:
        """Control, unknown and user-defined pieces (the Python API cannot tell the last apart, so
        their types are read from the model file)."""
        with open(self.path, "rb") as f:
            kinds = _sentencepiece_piece_types(f.read())
        return [self._sp.IdToPiece(i) for i, kind in enumerate(kinds) if kind in (2, 3, 4)]

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod_id(self) -> int:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else super().eod_id

    @property
    def pad_id(self) -> int | None:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else super().pad_id


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i


def _protobuf_fields(data: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _sentencepiece_piece_types(model: bytes) -> list[int]:
    """Type of each piece of a SentencePiece ModelProto (field 1: pieces; a piece's field 3: type,
    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    types = []
    for number, piece in _protobuf_fields(model):
        if number == 1:
            types.append(next((v for n, v in _protobuf_fields(piece) if n == 3), 1))
    return types


class BackendUnavailable(Exception):
    """gigatoken cannot serve this file; the message says why (internal: load_tokenizer reports it)."""


def _first_line(error: BaseException) -> str:
    """gigatoken's Rust errors carry a multi-line source location; the first line is the message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class GigatokenTokenizer(Tokenizer):
    """Encodes with gigatoken; everything else (vocabulary, special ids, decoding) is the reference's.

    `parallel` picks gigatoken's process-wide thread pool (sized by RAYON_NUM_THREADS when the pool
    starts) or the calling thread; None leaves gigatoken's own rule: parallel, except in a
    multiprocessing worker or forked child, where a pool would oversubscribe the cores or, after a
    fork, deadlock. Never call it from several Python threads at once: concurrent calls contend
    inside gigatoken and run slower than one.
    """

    backend = "gigatoken"

    def __init__(self, reference: Tokenizer, parallel: bool | None = None) -> None:
        self.path, self.sha256 = reference.path, reference.sha256
        self.reference, self.parallel = reference, parallel
        self.selection = self.backend
        try:
            import gigatoken
        except ImportError as e:
            raise BackendUnavailable(f"the gigatoken package is not installed ({INSTALL_FAST})") from e
        except Exception as e:  # a broken wheel (missing shared library, ABI mismatch)
            raise BackendUnavailable(f"the gigatoken package does not import ({_first_line(e)})") from e
        with open(self.path, "rb") as f:
            data = f.read()
        try:
            if self.path.endswith(".model"):
                self._gt = gigatoken.Tokenizer.from_sentencepiece(data)
            else:
                self._gt = gigatoken.Tokenizer.from_json(data)
        except Exception as e:
            raise BackendUnavailable(f"gigatoken cannot load {self.path}: {_first_line(e)}") from e
        except BaseException as e:  # a Rust panic (pyo3's PanicException is a BaseException)
            if type(e).__name__ != "PanicException":
                raise
            raise BackendUnavailable(f"gigatoken cannot load {self.path}: {_first_line(e)}") from e
        self.version = getattr(gigatoken, "__version__", None) or _package_version("gigatoken")

    def encode(self, text: str) -> list[int]:
        return self._gt.encode(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._gt.encode_batch_list(list(texts), parallel=self.parallel)

    def encode_flat(self, texts: Texts) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids, int64 lengths) straight from gigatoken's ragged array, no per-document objects.

        UTF-8 goes in as one buffer with 0xFF after each document (`Utf8Batch`), which gigatoken
        splits inside its parallel encode: faster than a list, and far faster than `str` (no
        conversion back to UTF-8). Empty documents, which gigatoken skips in a buffer, get zero ids
        (as every tokenizer gives them)."""
        if not isinstance(texts, Utf8Batch):
            if not len(texts):
                return np.zeros(0, np.uint32), np.zeros(0, np.int64)
            if not isinstance(texts[0], bytes):
                return self._ragged(list(texts))
            texts = Utf8Batch.from_texts(texts)
        lengths = np.zeros(len(texts), dtype=np.int64)
        nonempty = texts.lengths > 0
        if not texts.valid_utf8 and texts.buffer.count(SEPARATOR) != len(texts):  # not UTF-8: no buffer
            flat, lengths = self._ragged(texts.to_list())
        elif nonempty.any():
            from gigatoken import BytesSource

            flat, lengths[nonempty] = self._ragged(BytesSource(texts.buffer, separator=SEPARATOR))
        else:
            flat = np.zeros(0, np.uint32)
        return flat, lengths

    def _ragged(self, inputs: object) -> tuple[np.ndarray, np.ndarray]:
        layout = self._gt.encode_batch(inputs, parallel=self.parallel).layout  # ListOffsetArray
        offsets = np.asarray(layout.offsets.data)
        flat = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
        return flat, np.diff(offsets).astype(np.int64, copy=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.reference.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        return self.reference.token_to_id(token)

    def special_strings(self) -> list[str]:
        return self.reference.special_strings()

    @property
    def vocab_size(self) -> int:
        return self.reference.vocab_size

    @property
    def eod_id(self) -> int:
        return self.reference.eod_id

    @property
    def pad_id(self) -> int | None:
        return self.reference.pad_id


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------------- identity check
def probe_texts(special: Sequence[str], max_special: int = 256) -> list[tuple[str, str]]:
    """(label, text) pairs where byte-level BPE and SentencePiece implementations tend to differ."""
    rng = random.Random(17)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    letters = "".join(rng.choice(alphabet) for _ in range(3000))
    probes = [
        ("empty text", ""),
        ("one space", " "),
        ("only whitespace", " \t\n\r\n  \u00a0\u3000\u2028 "),
        ("leading, repeated and trailing spaces", "  two  spaces,   three   spaces and a trailing one "),
        ("newlines, carriage returns and tabs", "line one\nline two\r\n\tindented\n\n\n  end\r"),
        ("combining characters", "cafe\u0301 n\u0303o A\u030a \u1e9b\u0323 \u0915\u094d\u0937 e\u0301\u0301"),
        ("precomposed letters", "café ñ Å résumé naïve Ångström"),
        ("emoji", "👩\u200d👩\u200d👧 🎉🎉 👍🏽 🇺🇳 ❤️ x🙂y"),
        ("scripts", "日本語のテキスト 中文 한국어 مرحبا بالعالم Привет мир ελληνικά עברית"),
        ("compatibility characters", "ﬁ ＡＢＣ ① ½ ™ ℌ ㎞"),
        ("digits and punctuation", "3.14159 1,000,000 $42.00 ... !!! ??? --- *** ((()))"),
        ("code", "def f(x):\n    return x**2  # comment\n\tif (a && b) { c++; } // done"),
        ("control characters", "a\x00b\x01c\x1fd\x7fe\u200bf\u200dg\ufeffh"),
        ("a very long word", "x" * 5000),
        ("a long word of varied characters", letters),
        ("a long repeated pair", "ab" * 2500),
        ("a long compound", "supercalifragilisticexpialidocious" * 60),
        ("a URL", "https://example.com/a/b?query=1&b=%20#frag"),
    ]
    for token in special[:max_special]:
        probes += [
            (f"special token {token!r} alone", token),
            (f"special token {token!r} inside a word", f"word{token}word"),
            (f"special token {token!r} between spaces", f"a {token} b"),
            (f"special token {token!r} twice", f"{token}{token}\n{token}"),
        ]
    return probes


@dataclass(frozen=True)
class Mismatch:
    """The first text on which two backends disagree."""

    where: str
    reference: list[int]
    fast: list[int]

    @property
    def position(self) -> int:
        return next((i for i, (a, b) in enumerate(zip(self.reference, self.fast)) if a != b),
                    min(len(self.reference), len(self.fast)))  # fmt: skip

    def describe(self, reference_name: str) -> str:
        k = self.position
        return (
            f"{self.where}: {reference_name} gives {_excerpt(self.reference, k)}, gigatoken gives "
            f"{_excerpt(self.fast, k)} (first difference at id {k})"
        )


def _excerpt(ids: list[int], k: int, width: int = 12) -> str:
    """The ids, or for a long sequence the ids around position k."""
    if len(ids) <= 2 * width:
        return f"{ids} ({len(ids)} ids)"
    lo, hi = max(0, k - width // 2), min(len(ids), k + width // 2)
    head, tail = ("[... " if lo else "["), (" ...]" if hi < len(ids) else "]")
    return f"{head}{', '.join(map(str, ids[lo:hi]))}{tail} (ids {lo}..{hi - 1} of {len(ids)})"


def first_mismatch(
    reference: Tokenizer, fast: Tokenizer, texts: Sequence[tuple[str, str]]
) -> Mismatch | None:
    """The first (label, text) on which `fast` (through `encode_flat` of the texts as `str` and as
    UTF-8 `bytes`, both of which the pipeline passes) and `reference` disagree, or None."""
    if not texts:
        return None
    strings = [t for _, t in texts]
    expected = reference.encode_batch(strings)
    for inputs in (strings, [t.encode("utf-8") for t in strings]):
        flat, lengths = fast.encode_flat(inputs)
        ends = np.cumsum(lengths)
        for (where, _), ids, end, n in zip(texts, expected, ends, lengths):
            got = flat[end - n : end].tolist()
            if got != list(ids):
                return Mismatch(where, list(ids), got)
    return None


# ------------------------------------------------------------------------------------------ loading
def _resolve_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.isfile(path):
        raise TokenizerNotFoundError(
            f"tokenizer file not found: {path}; point data.tokenizer at a tokenizer.json or a "
            "SentencePiece .model, or make one with tools/train_tokenizer.py"
        )
    return path


def _advice(setting: str, value: str) -> str:
    """How to choose `value` in the caller's terms: a flag or a config field."""
    return f"pass {setting} {value}" if setting.startswith("-") else f"set {setting}={value}"


def load_tokenizer(
    path: str | os.PathLike,
    backend: str | None = None,
    *,
    samples: Sequence[tuple[str, str]] = (),
    setting: str = "--tokenizer-backend",
    verify: bool = True,
    parallel: bool | None = None,
) -> Tokenizer:
    """Load `tokenizer.json` (Hugging Face) or `*.model` (SentencePiece) with the chosen backend.

    A directory means its `tokenizer.json` or `tokenizer.model`. `backend` is one of
    `TOKENIZER_BACKENDS`, or None for the file's own library. Before gigatoken is returned it must
    agree with that library on `probe_texts` and on `samples` ((label, text) pairs, e.g. the first
    documents of a run) unless `verify` is False (workers of a run that already checked).
    `setting` names the flag or config field in error messages; `parallel` goes to gigatoken.
    The returned tokenizer's `selection` says which backend runs and why.
    """
    path = _resolve_path(path)
    if backend is not None and backend not in TOKENIZER_BACKENDS:
        raise TokenizerBackendError(f"{setting} {backend!r}: choose one of {', '.join(TOKENIZER_BACKENDS)}")
    own = "sentencepiece" if path.endswith(".model") else "tokenizers"
    if backend in ("tokenizers", "sentencepiece") and backend != own:
        kind = "a SentencePiece model" if own == "sentencepiece" else "not a SentencePiece .model file"
        raise TokenizerBackendError(
            f"{setting} {backend} cannot read {path} ({kind}); {_advice(setting, own)}, gigatoken or auto"
        )
    reference = SentencePieceTokenizer(path) if own == "sentencepiece" else HFTokenizer(path)
    if backend in (None, own):
        reference.selection = f"{own} ({'asked for' if backend else 'the library of this file'})"
        return reference
    try:
        fast = GigatokenTokenizer(reference, parallel=parallel)
    except BackendUnavailable as e:
        if backend == "gigatoken":
            raise TokenizerBackendError(f"{setting} gigatoken: {e}; {_advice(setting, own)} instead") from e
        reference.selection = f"{own} (auto: {e})"
        return reference
    if not verify:
        fast.selection = f"gigatoken {fast.version} (checked by the caller)"
        return fast
    probes = probe_texts(reference.special_strings())
    mismatch = first_mismatch(reference, fast, probes)
    if mismatch is not None:
        if backend == "gigatoken":
            raise TokenizerMismatchError(
                f"gigatoken and {own} disagree on {mismatch.describe(own)}; {_advice(setting, own)}"
            )
        reference.selection = f"{own} (auto: gigatoken cannot reproduce {path}: {mismatch.describe(own)})"
        return reference
    mismatch = first_mismatch(reference, fast, samples)
    if mismatch is not None:
        raise TokenizerMismatchError(
            f"gigatoken and {own} disagree on {mismatch.describe(own)}; the output must not depend on the "
            f"backend, so this run stops: {_advice(setting, own)}"
        )
    why = "asked for" if backend == "gigatoken" else f"auto: installed and loads {os.path.basename(path)}"
    fast.selection = (
        f"gigatoken {fast.version} ({why}; same ids as {own} on {len(probes)} probe texts and "
        f"{len(samples)} sample documents)"
    )
    return fast
