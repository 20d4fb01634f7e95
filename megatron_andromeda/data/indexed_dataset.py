"""Megatron's memory-mapped indexed dataset (`.bin` + `.idx`), read and written byte-compatibly.

The layout is documented in `megatron_andromeda/data/README.md`. In short, `PREFIX.bin` holds the
tokens of every sequence back to back, and `PREFIX.idx` holds a small header followed by three arrays:

    magic    9 bytes   b"MMIDIDX\\x00\\x00"
    version  <Q        1
    dtype    <B        Megatron dtype code (see `DTYPE_CODES`)
    n_seq    <Q        number of sequences
    n_doc    <Q        number of entries in document_indices (= documents + 1)
    sizes             int32[n_seq]   tokens per sequence
    pointers          int64[n_seq]   byte offset of each sequence in the .bin
    document_indices  int64[n_doc]   sequence index where each document starts, then n_seq

Files written here are byte-identical to megatron-core's `IndexedDatasetBuilder` for the same
documents, so datasets move freely between the two projects.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from megatron_andromeda.errors import UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, n_seq, n_doc

# Megatron's dtype codes (megatron/core/datasets/indexed_dataset.py `DType`).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


class DatasetError(UserError, ValueError):
    """A dataset file that cannot be used; the message names the file and what to do."""

    label = "data error"


def data_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


def dtype_code(dtype: np.dtype | type) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        supported = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dtype} has no Megatron dtype code; use one of: {supported}")
    return _CODE_OF_DTYPE[dtype]


# ------------------------------------------------------------------------------------------- writer
class IndexedDatasetWriter:
    """Appends documents to `PREFIX.bin` and writes `PREFIX.idx` at `finalize()`.

    Both files are written under temporary names (`PREFIX.bin.tmp`, `PREFIX.idx.tmp`), fsynced and
    renamed into place only when `finalize()` succeeds, so a crash never leaves a half-written
    dataset under the real name. As a context manager, a clean exit finalizes and an exception aborts
    (the temporary files are removed).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail now on an unsupported dtype
        parent = os.path.dirname(self.prefix)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._bin_tmp = data_file_path(self.prefix) + ".tmp"
        self._idx_tmp = index_file_path(self.prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._sizes: list[np.ndarray] = []  # int32 chunks of sequence lengths
        self._doc_starts: list[int] = [0]
        self._num_sequences = 0
        self._closed = False

    @staticmethod
    def best_dtype(vocab_size: int) -> np.dtype:
        """The smallest dtype holding token ids 0..vocab_size-1: uint16 up to 65,536 ids, else int32."""
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one document made of one sequence."""
        self.add_documents([tokens])

    def add_documents(self, documents: Iterable[np.ndarray | Sequence[int]]) -> None:
        """Append several one-sequence documents with a single write to the `.bin`."""
        self._check_open()
        arrays = [self._as_tokens(doc) for doc in documents]
        if not arrays:
            return
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        if lengths.max(initial=0) > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: a document longer than 2^31-1 tokens cannot be indexed")
        self._bin.write(np.concatenate(arrays).tobytes())
        self._sizes.append(lengths.astype(np.int32))
        first = self._num_sequences + 1
        self._num_sequences += len(arrays)
        self._doc_starts.extend(range(first, self._num_sequences + 1))

    def add_flat_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append one-sequence documents given back to back: `tokens` holds `lengths[i]` ids of
        document i after those of documents < i. One write, no per-document arrays."""
        self._check_open()
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or int(lengths.sum()) != np.asarray(tokens).size or (lengths < 0).any():
            raise ValueError(f"{self.prefix}: lengths must be non-negative and sum to the number of tokens")
        if lengths.size == 0:
            return
        if lengths.max() > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: a document longer than 2^31-1 tokens cannot be indexed")
        self._bin.write(memoryview(np.ascontiguousarray(self._as_tokens(tokens))))
        self._sizes.append(lengths.astype(np.int32))
        first = self._num_sequences + 1
        self._num_sequences += int(lengths.size)
        self._doc_starts.extend(range(first, self._num_sequences + 1))

    def add_document_sequences(self, sequences: Sequence[np.ndarray | Sequence[int]]) -> None:
        """Append one document made of several sequences (e.g. one per sentence)."""
        self._check_open()
        arrays = [self._as_tokens(seq) for seq in sequences]
        if arrays:
            self._bin.write(np.concatenate(arrays).tobytes())
            self._sizes.append(np.array([a.size for a in arrays], dtype=np.int32))
        self._num_sequences += len(arrays)
        self._doc_starts.append(self._num_sequences)

    def add_dataset(
        self, prefix: str | os.PathLike, keep: np.ndarray | None = None, block_bytes: int = 1 << 24
    ) -> None:
        """Append the documents of the dataset at `prefix` (same dtype), or those where `keep` (one
        bool per document) is set; the `.bin` is copied in blocks, one run of kept documents at a time."""
        self._check_open()
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DatasetError(
                f"{other.prefix}: tokens are {other.dtype}, the dataset being written holds {self.dtype}"
            )
        starts = np.asarray(other.document_indices, dtype=np.int64)  # sequence index per document
        if keep is None:
            keep = np.ones(other.num_documents, dtype=bool)
        elif len(keep) != other.num_documents:
            raise ValueError(
                f"{other.prefix}: keep has {len(keep)} entries for {other.num_documents} documents"
            )
        ends = np.append(other.pointers, other.num_tokens * self.dtype.itemsize)  # byte offset per sequence
        with open(data_file_path(other.prefix), "rb") as src:
            for first, last in _true_runs(np.asarray(keep, dtype=bool)):  # documents [first, last)
                seq_lo, seq_hi = int(starts[first]), int(starts[last])
                src.seek(int(ends[seq_lo]))
                remaining = int(ends[seq_hi] - ends[seq_lo])
                while remaining:
                    block = src.read(min(block_bytes, remaining))
                    if not block:
                        raise DatasetError(f"{data_file_path(other.prefix)}: shorter than its index says")
                    self._bin.write(block)
                    remaining -= len(block)
                self._sizes.append(np.asarray(other.sizes[seq_lo:seq_hi], dtype=np.int32))
                shift = self._num_sequences - seq_lo
                self._doc_starts.extend((starts[first + 1 : last + 1] + shift).tolist())
                self._num_sequences += seq_hi - seq_lo

    def finalize(self) -> None:
        """Write the index, fsync both files and move them to their final names."""
        self._check_open()
        self._closed = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
            with open(self._idx_tmp, "wb") as f:
                f.write(encode_index(self.dtype, sizes, np.asarray(self._doc_starts, np.int64)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._bin_tmp, data_file_path(self.prefix))
            os.replace(self._idx_tmp, index_file_path(self.prefix))
        except BaseException:
            self._remove_temporaries()
            raise
        _fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))

    def abort(self) -> None:
        """Drop everything written so far; the final files are never created."""
        if self._closed:
            return
        self._closed = True
        self._bin.close()
        self._remove_temporaries()

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()

    def _as_tokens(self, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"{self.prefix}: a document must be a 1-D token array, got shape {array.shape}")
        return array.astype(self.dtype, copy=False)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"IndexedDatasetWriter({self.prefix!r}) is already finalized or aborted")

    def _remove_temporaries(self) -> None:
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def encode_index(dtype: np.dtype, sizes: np.ndarray, document_indices: np.ndarray) -> bytes:
    """The complete `.idx` file for sequences of `sizes` tokens of `dtype`."""
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(sizes.size, dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    header = INDEX_MAGIC + struct.pack(
        "<QBQQ", INDEX_VERSION, dtype_code(dtype), sizes.size, len(document_indices)
    )
    return b"".join(
        (header, sizes.tobytes(), pointers.tobytes(), np.asarray(document_indices, np.int64).tobytes())
    )


def _fsync_dir(path: str) -> None:
    """Persist the renames themselves (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class _Index:
    dtype: np.dtype
    sizes: np.ndarray  # int32 [n_seq]
    pointers: np.ndarray  # int64 [n_seq], byte offsets into the .bin
    document_indices: np.ndarray  # int64 [n_doc + 1]


def _read_index(prefix: str) -> _Index:
    """Parse and structurally check `PREFIX.idx` against the size of `PREFIX.bin` (no token scan)."""
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DatasetError(
                f"{path}: file not found; build the dataset with tools/preprocess_data.py "
                f"(it writes {prefix}.bin and {prefix}.idx)"
            )
    idx_bytes = os.path.getsize(idx_path)
    if idx_bytes < HEADER_SIZE:
        raise DatasetError(f"{idx_path}: {idx_bytes} bytes is shorter than the {HEADER_SIZE}-byte header")
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DatasetError(
            f"{idx_path}: bad magic {header[:9]!r} (expected {INDEX_MAGIC!r}); "
            "this is not a Megatron mmap indexed dataset index"
        )
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(INDEX_MAGIC) :])
    if version != INDEX_VERSION:
        raise DatasetError(f"{idx_path}: index version {version} is not supported (expected {INDEX_VERSION})")
    if code not in DTYPE_CODES:
        raise DatasetError(f"{idx_path}: unknown dtype code {code} (valid codes: {sorted(DTYPE_CODES)})")
    expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if idx_bytes != expected:
        raise DatasetError(
            f"{idx_path}: {idx_bytes} bytes but the header ({n_seq} sequences, {n_doc} document "
            f"entries) implies {expected}; the index is truncated or corrupt, rebuild the dataset"
        )
    buffer = np.memmap(idx_path, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(buffer, np.int32, n_seq, HEADER_SIZE)
    pointers = np.frombuffer(buffer, np.int64, n_seq, HEADER_SIZE + 4 * n_seq)
    doc_indices = np.frombuffer(buffer, np.int64, n_doc, HEADER_SIZE + 12 * n_seq)
    index = _Index(DTYPE_CODES[code], sizes, pointers, doc_indices)
    _check_index(index, idx_path, bin_path)
    return index


def _check_index(index: _Index, idx_path: str, bin_path: str) -> None:
    sizes, pointers, docs = index.sizes, index.pointers, index.document_indices
    itemsize = index.dtype.itemsize
    if sizes.size and sizes.min() < 0:
        raise DatasetError(f"{idx_path}: negative sequence length at sequence {int(np.argmin(sizes))}")
    if sizes.size:
        expected_pointers = np.zeros_like(pointers)
        np.cumsum(sizes[:-1], dtype=np.int64, out=expected_pointers[1:])
        expected_pointers *= itemsize
        bad = np.flatnonzero(expected_pointers != pointers)
        if bad.size:
            raise DatasetError(
                f"{idx_path}: sequence pointers are not contiguous/monotonic from sequence {bad[0]} "
                f"(pointer {pointers[bad[0]]}, expected {expected_pointers[bad[0]]}); rebuild the dataset"
            )
    data_bytes = int(sizes.sum(dtype=np.int64)) * itemsize
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes != data_bytes:
        raise DatasetError(
            f"{bin_path}: {bin_bytes} bytes but {idx_path} describes {data_bytes} "
            f"({data_bytes // itemsize} {index.dtype} tokens); the .bin is truncated or belongs to "
            "another index, rebuild the dataset"
        )
    if docs.size == 0 or docs[0] != 0 or docs[-1] != sizes.size:
        raise DatasetError(
            f"{idx_path}: document_indices must start at 0 and end at the sequence count {sizes.size}"
        )
    if docs.size > 1 and np.any(np.diff(docs) < 0):
        raise DatasetError(f"{idx_path}: document_indices decrease at entry {int(np.argmin(np.diff(docs)))}")


class IndexedDataset:
    """Read-only, zero-copy view of `PREFIX.bin`/`PREFIX.idx` through `np.memmap`.

    Opening runs the cheap structural checks (header, lengths, pointers, file sizes); the token scan
    lives in `validate_indexed_dataset`.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        index = _read_index(self.prefix)
        self.dtype: np.dtype = index.dtype
        self.sizes: np.ndarray = index.sizes
        self.pointers: np.ndarray = index.pointers
        self.document_indices: np.ndarray = index.document_indices
        if self.sizes.sum(dtype=np.int64) > 0:
            # A plain ndarray over the map: slicing it skips np.memmap's per-slice bookkeeping.
            self._tokens = np.asarray(np.memmap(data_file_path(self.prefix), dtype=self.dtype, mode="r"))
        else:  # mmap cannot map an empty file
            self._tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __reduce__(self) -> tuple:
        # Pickled by path (e.g. into spawned DataLoader workers): the maps are reopened, not copied.
        return (type(self), (self.prefix,))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, a view into the memory map."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {len(self)} sequences")
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self.prefix}: slice [{offset}, {offset + length}) outside sequence {i} of {size}"
            )
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one flat memory-mapped array."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size - 1)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, {self.dtype})"
        )


# --------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class DatasetSummary:
    prefix: str
    dtype: str
    num_sequences: int
    num_documents: int
    num_tokens: int
    max_token_id: int | None  # None when tokens were not scanned or the dataset is empty
    bin_bytes: int

    def __str__(self) -> str:
        max_id = "not scanned" if self.max_token_id is None else str(self.max_token_id)
        return (
            f"{self.prefix}: {self.num_documents:,} documents, {self.num_sequences:,} sequences, "
            f"{self.num_tokens:,} tokens ({self.dtype}, {self.bin_bytes:,} bytes), max token id {max_id}"
        )


def max_token_id(dataset: IndexedDataset, chunk_tokens: int = 1 << 26) -> int | None:
    """Largest token id, scanned in chunks so memory stays bounded on huge datasets."""
    tokens, best = dataset.tokens, None
    for start in range(0, tokens.size, chunk_tokens):
        chunk_max = int(tokens[start : start + chunk_tokens].max())
        best = chunk_max if best is None else max(best, chunk_max)
    return best


def validate_indexed_dataset(
    prefix: str | os.PathLike, vocab_size: int | None = None, check_tokens: bool = True
) -> DatasetSummary:
    """Check a dataset end to end and summarise it; raises `DatasetError` on the first problem.

    Structure is always checked (magic, version, dtype code, index lengths, pointer monotonicity and
    `.bin` size, document index range). With `check_tokens`, every token is scanned: ids must be
    non-negative and, when `vocab_size` is given, below it.
    """
    dataset = IndexedDataset(prefix)
    top = None
    if check_tokens and dataset.num_tokens:
        top = max_token_id(dataset)
        if dataset.dtype.kind == "i" and int(dataset.tokens.min()) < 0:
            raise DatasetError(f"{data_file_path(prefix)}: negative token ids; the dataset is corrupt")
        if vocab_size is not None and top >= vocab_size:
            raise DatasetError(
                f"{data_file_path(prefix)}: token id {top} >= vocab_size {vocab_size}; the dataset was "
                "tokenized with a larger vocabulary: raise model.vocab_size or re-tokenize"
            )
    return DatasetSummary(
        prefix=os.fspath(prefix),
        dtype=str(dataset.dtype),
        num_sequences=len(dataset),
        num_documents=dataset.num_documents,
        num_tokens=dataset.num_tokens,
        max_token_id=top,
        bin_bytes=Path(data_file_path(prefix)).stat().st_size,
    )
