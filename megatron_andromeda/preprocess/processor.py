"""Worker-side processing of one chunk: decode, clean, fingerprint, split and tokenize.

Everything expensive and independent per document happens here, in the worker processes: JSON
decoding, cleaning and quality rules, dedup digests and MinHash band keys, the split hash, and
tokenization (one `encode_batch` call per chunk and key, so the tokenizer's own Rust threads do the
work). A chunk comes back as flat token arrays, cheap to pickle. The decisions that need the whole
run (is this a duplicate of an earlier document?) are left to the main process.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.preprocess.cleaning import CleaningConfig, clean_record
from megatron_andromeda.preprocess.dedup import MinHasher, exact_digest
from megatron_andromeda.preprocess.readers import RawChunk, decode_chunk
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

    def __init__(self, settings: ProcessorSettings) -> None:
        from megatron_andromeda.data.tokenizer import load_tokenizer

        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer_path)
        self.eod = self.tokenizer.eod_id if settings.append_eod else None
        self.dtype = np.dtype(settings.dtype)
        self.splitter = Splitter(settings.split_weights) if settings.split_weights else None

    def __call__(self, chunk: RawChunk) -> ChunkResult:
        s = self.settings
        decoded = decode_chunk(chunk, s.json_keys, json.loads)  # JSON is ~1% of the time: stdlib
        dropped = list(decoded.malformed)
        texts, lines = decoded.texts, decoded.lines
        words: list[Words | None] = [None] * len(texts)
        if s.cleaning is not None:
            texts, lines, words = self._clean(texts, lines, dropped)
        joined = [t[0] if len(t) == 1 else "\n".join(t) for t in texts]  # the record as one text
        digests = [exact_digest(t) for t in joined] if s.exact_dedup else None
        band_keys = None
        if s.minhash is not None:
            band_keys = np.zeros((len(joined), s.minhash.bands[0]), dtype=np.uint64)
            for i, (text, w) in enumerate(zip(joined, words)):
                if w is None:
                    w = split_words(text.encode("utf-8"), text.isascii())
                band_keys[i] = s.minhash.band_keys(w)
        splits = np.zeros(len(joined), dtype=np.int8)
        if self.splitter is not None:
            splits[:] = [self.splitter.split_of(t.encode("utf-8")) for t in joined]
        tokens, lengths = [], []
        for k in range(len(s.json_keys)):
            flat, sizes = self._tokenize([t[k] for t in texts])
            tokens.append(flat)
            lengths.append(sizes)
        return ChunkResult(
            chunk.file_index, len(chunk), dropped, np.asarray(lines, dtype=np.int64), splits,
            digests, band_keys, tokens, lengths,
        )  # fmt: skip

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

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All `texts` tokenized (plus EOD) as one flat array and per-document lengths."""
        ids = self.tokenizer.encode_batch(texts) if texts else []
        if self.eod is not None:
            for doc in ids:
                doc.append(self.eod)
        sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(sizes.sum()))
        return flat, sizes


# ------------------------------------------------------------------ multiprocessing worker entry points
# Each worker process builds its processor once, in the pool initializer, and keeps it for its lifetime
# (the usual multiprocessing idiom: per-process state, never shared or mutated across processes).
_WORKER: ChunkProcessor | None = None


def init_worker(settings: ProcessorSettings, threads: int) -> None:
    """Pool initializer: cap the tokenizer's Rust thread pool, then load the tokenizer."""
    global _WORKER
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    _WORKER = ChunkProcessor(settings)


def process_in_worker(chunk: RawChunk) -> ChunkResult:
    if _WORKER is None:
        raise RuntimeError("process_in_worker called outside a pool started with init_worker")
    return _WORKER(chunk)
