"""Per-chunk processing: decode, clean, fingerprint and split (`prepare`), then tokenize (`tokenize`).

Everything expensive and independent per document happens here: JSON decoding (in C++ where exact,
see fast.py), cleaning and quality
rules, dedup digests and MinHash band keys, the split hash, and tokenization (one batched call per
chunk and key into the tokenizer's own Rust code). The two halves are separate so the in-process run
can prepare the next chunk on one thread while the tokenizer, which releases the GIL, encodes this
one on its thread pool; worker processes simply run both. A chunk comes back as flat token arrays
(end-of-document ids already in place), cheap to pickle and written with one call. The decisions that
need the whole run (is this a duplicate of an earlier document?) are left to the main process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.data.tokenizer import Tokenizer, Utf8Batch, load_tokenizer
from megatron_andromeda.preprocess.cleaning import CleaningConfig, clean_record
from megatron_andromeda.preprocess.dedup import MinHasher, exact_digest
from megatron_andromeda.preprocess.fast import decode_columns_utf8, with_eod
from megatron_andromeda.preprocess.readers import RawChunk
from megatron_andromeda.preprocess.split import Splitter
from megatron_andromeda.preprocess.words import Words, split_words


@dataclass(frozen=True)
class ProcessorSettings:
    """What a worker needs to process chunks; picklable, sent once per worker."""

    tokenizer_path: str
    json_keys: tuple[str, ...]
    dtype: str  # numpy dtype name of the output tokens
    append_eod: bool
    cleaning: CleaningConfig | None
    exact_dedup: bool
    minhash: MinHasher | None
    split_weights: tuple[float, float, float] | None  # None: everything goes to split 0
    tokenizer_backend: str | None = None  # the backend the main process chose and checked
    tokenizer_threads: int = 1  # threads of the tokenizer's pool; 1 encodes on the calling thread


@dataclass
class PreparedChunk:
    """A chunk's candidates before tokenization: the well-formed records that passed the rules."""

    file_index: int
    num_records: int
    dropped: list[tuple[str, int]]  # (reason, line) of malformed or low-quality records
    columns: list[Utf8Batch] | list[list[str]]  # per key: (K,) texts, UTF-8 (or str once cleaned)
    lines: np.ndarray  # (K,) line of each candidate
    splits: np.ndarray  # (K,) int8 split index
    digests: list[bytes] | None  # (K,) exact-dedup digests
    band_keys: np.ndarray | None  # (K, bands) uint64 MinHash LSH keys


@dataclass
class ChunkResult:
    """A processed chunk. Candidates are the well-formed documents that passed the quality rules."""

    file_index: int
    num_records: int
    dropped: list[tuple[str, int]]  # (reason, line) of malformed or low-quality records
    lines: np.ndarray  # (K,) line of each candidate
    splits: np.ndarray  # (K,) int8 split index
    digests: list[bytes] | None  # (K,) exact-dedup digests
    band_keys: np.ndarray | None  # (K, bands) uint64 MinHash LSH keys
    tokens: list[np.ndarray]  # per key: all candidates' tokens back to back
    lengths: list[np.ndarray]  # per key: (K,) int64 tokens per candidate

    @property
    def num_candidates(self) -> int:
        return int(self.lines.size)


class ChunkProcessor:
    """Turns `RawChunk`s into `ChunkResult`s; one per worker process (or one in-process)."""

    def __init__(self, settings: ProcessorSettings, tokenizer: Tokenizer | None = None) -> None:
        self.settings = settings
        if tokenizer is None:  # a worker: the main process already chose and checked the backend
            tokenizer = load_tokenizer(
                settings.tokenizer_path, settings.tokenizer_backend, verify=False,
                parallel=settings.tokenizer_threads > 1,
            )  # fmt: skip
        self.tokenizer = tokenizer
        self.eod = self.tokenizer.eod_id if settings.append_eod else None
        self.dtype = np.dtype(settings.dtype)
        self.splitter = Splitter(settings.split_weights) if settings.split_weights else None

    def __call__(self, chunk: RawChunk) -> ChunkResult:
        return self.tokenize(self.prepare(chunk))

    def prepare(self, chunk: RawChunk) -> PreparedChunk:
        """Decode, clean, fingerprint and split a chunk (Python work, holds the GIL).

        Texts stay one UTF-8 buffer per key (what gigatoken encodes fastest, with no object per
        document) unless the cleaning rules need `str`; the digest, split hash and MinHash words
        are computed from whichever form is at hand, with the same result."""
        s = self.settings
        decoded = decode_columns_utf8(chunk, s.json_keys)
        dropped = list(decoded.malformed)
        columns, lines = decoded.columns, decoded.lines
        words: list[Words | None] = [None] * len(lines)
        if s.cleaning is not None:
            records, lines, words = self._clean(decoded.records(), lines, dropped)
            columns = [list(column) for column in zip(*records)] if records else [[] for _ in s.json_keys]
        per_record = s.exact_dedup or s.minhash is not None or self.splitter is not None
        joined = _joined(columns) if per_record else []  # each record as one text (str or UTF-8)
        utf8 = [_utf8(t) for t in joined] if self.splitter is not None or s.minhash is not None else []
        digests = [exact_digest(_text(t)) for t in joined] if s.exact_dedup else None
        band_keys = None
        if s.minhash is not None:
            band_keys = np.zeros((len(joined), s.minhash.bands[0]), dtype=np.uint64)
            for i, (data, w) in enumerate(zip(utf8, words)):
                if w is None:
                    w = split_words(data, data.isascii())
                band_keys[i] = s.minhash.band_keys(w)
        splits = np.zeros(len(lines), dtype=np.int8)
        if self.splitter is not None:
            splits[:] = [self.splitter.split_of(data) for data in utf8]
        return PreparedChunk(
            chunk.file_index, len(chunk), dropped, columns, np.asarray(lines, dtype=np.int64), splits,
            digests, band_keys,
        )  # fmt: skip

    def tokenize(self, prepared: PreparedChunk) -> ChunkResult:
        """Tokenize every candidate, one batched call per key (the tokenizer releases the GIL)."""
        tokens, lengths = [], []
        for k in range(len(self.settings.json_keys)):
            flat, sizes = self.tokenizer.encode_flat(prepared.columns[k])
            flat, sizes = with_eod(flat, sizes, self.eod, self.dtype)
            tokens.append(flat)
            lengths.append(sizes)
        p = prepared
        return ChunkResult(
            p.file_index, p.num_records, p.dropped, p.lines, p.splits, p.digests, p.band_keys, tokens, lengths
        )

    def _clean(
        self, texts: list[tuple[str, ...]], lines: list[int], dropped: list[tuple[str, int]]
    ) -> tuple[list[tuple[str, ...]], list[int], list[Words | None]]:
        """Normalise every text and keep the records whose every text passes the quality rules.

        Also returns the words of each kept single-text record, which the MinHash step reuses."""
        config = self.settings.cleaning
        kept_texts, kept_lines, kept_words = [], [], []
        for record, line in zip(texts, lines):
            cleaned, split, reason = clean_record(record, config)
            if reason is None:
                kept_texts.append(cleaned)
                kept_lines.append(line)
                kept_words.append(split[0] if len(split) == 1 else None)
            else:
                dropped.append((reason, line))
        return kept_texts, kept_lines, kept_words


def _joined(columns: list[Utf8Batch] | list[list[str]]) -> list[str] | list[bytes]:
    """Each record's texts as one text, newline-separated (the same bytes whether str or UTF-8)."""
    lists = [column.to_list() if isinstance(column, Utf8Batch) else column for column in columns]
    if len(lists) == 1:
        return lists[0]
    return [(b"\n" if isinstance(r[0], bytes) else "\n").join(r) for r in zip(*lists)]


def _utf8(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _text(text: str | bytes) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text


# ------------------------------------------------------------------ multiprocessing worker entry points
# Each worker process builds its processor once, in the pool initializer, and keeps it for its lifetime
# (the usual multiprocessing idiom: per-process state, never shared or mutated across processes).
_WORKER: ChunkProcessor | None = None


def init_worker(settings: ProcessorSettings) -> None:
    """Pool initializer: size the tokenizer's Rust thread pool, then load the tokenizer."""
    global _WORKER
    threads = str(settings.tokenizer_threads)
    os.environ["RAYON_NUM_THREADS"] = threads  # gigatoken's pool and the tokenizers library's
    os.environ["RAYON_RS_NUM_CPUS"] = threads  # the tokenizers library's older name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    _WORKER = ChunkProcessor(settings)


def process_in_worker(chunk: RawChunk) -> ChunkResult:
    if _WORKER is None:
        raise RuntimeError("process_in_worker called outside a pool started with init_worker")
    return _WORKER(chunk)
