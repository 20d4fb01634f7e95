"""Typed wrappers of the C++ hot loops in csrc/preprocess_fast.cpp (`_fast`, built at install time).

`decode_columns_utf8`: JSONL chunks decoded in C++ (GIL released) into one UTF-8 buffer per key
(`Utf8Batch`), exactly as `readers.decode_chunk` with `json.loads` decodes them. Decoding JSON in
Python costs about half as much CPU as gigatoken's encoding of the same text, so it would dominate
the fast path; and gigatoken encodes UTF-8 bytes faster than `str` (no conversion back to UTF-8),
so texts stay UTF-8 until a rule needs `str`, in the buffer layout gigatoken splits itself (no
Python object per document on the fast path). The C++ scanner takes only the lines it can decode
exactly: valid UTF-8, strict JSON, one object whose requested keys all hold strings without lone
surrogates. It flags any other line (malformed, unusual or just outside its strict
subset: NaN, huge integers, deep nesting), and those go through `readers.decode_chunk` one by one,
which counts and names whatever is wrong with them. Same texts, same lines, same malformed reasons,
in the same order.

`with_eod`: token ids re-typed with the end-of-document id after each document, in one pass.

`tests/test_preprocess_fast.py` holds each equal to its Python definition (`readers.decode_chunk`,
`with_eod_reference`) on adversarial inputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.data.tokenizer import Utf8Batch
from megatron_andromeda.preprocess.readers import DecodedChunk, RawChunk, decode_chunk

try:
    from megatron_andromeda.preprocess import _fast
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "the C++ extension megatron_andromeda.preprocess._fast is missing or stale; rebuild it with "
        "`pip install --no-build-isolation -e .` from the repository root"
    ) from e


@dataclass
class DecodedColumns:
    """The well-formed records of a chunk as one `Utf8Batch` per key, and what was wrong with the
    others: `readers.DecodedChunk` turned into columns of UTF-8."""

    columns: list[Utf8Batch]  # per key: the text of each well-formed record
    lines: list[int]  # 1-based line/row of each record in its file
    malformed: list[tuple[str, int]]  # (reason, line)

    def records(self) -> list[tuple[str, ...]]:
        """Each record's texts as `str` (for the rules that need them)."""
        columns = [[t.decode("utf-8") for t in column.to_list()] for column in self.columns]
        return list(zip(*columns)) if columns else []


def _encodable(keys: Sequence[str]) -> bool:
    try:
        for key in keys:
            key.encode("utf-8")
    except UnicodeEncodeError:  # a key with lone surrogates (from a mis-decoded command line)
        return False
    return True


def _from_python(decoded: DecodedChunk, nkeys: int) -> DecodedColumns:
    columns = [[t.encode("utf-8") for t in column] for column in zip(*decoded.texts)] or [[]] * nkeys
    columns = [Utf8Batch.from_texts(c, valid_utf8=True) for c in columns]  # from str: valid UTF-8
    return DecodedColumns(columns, decoded.lines, decoded.malformed)


def decode_columns_utf8(chunk: RawChunk, keys: Sequence[str]) -> DecodedColumns:
    """`decode_chunk(chunk, keys, json.loads)` as UTF-8 columns; JSONL lines are scanned in C++
    where that is exact, the rest (and columnar chunks) decoded in Python."""
    if chunk.lines is None or not _encodable(keys):
        return _from_python(decode_chunk(chunk, keys, json.loads), len(keys))
    taken, buffers, lengths = _fast.decode_jsonl_columns(chunk.lines, list(keys))
    lines = np.arange(chunk.first_line, chunk.first_line + len(chunk.lines))
    if taken.all():
        columns = [Utf8Batch(buffer, lengths[:, k], valid_utf8=True) for k, buffer in enumerate(buffers)]
        return DecodedColumns(columns, lines.tolist(), [])
    # Python decodes the rest; a well-formed record among them is spliced into the columns.
    out = DecodedColumns([], [], [])
    fast_columns = [Utf8Batch(buffer, lengths[:, k]).to_list() for k, buffer in enumerate(buffers)]
    columns: list[list[bytes]] = [[] for _ in keys]
    next_fast = 0
    for i in range(len(chunk.lines)):
        if taken[i]:
            for k, column in enumerate(columns):
                column.append(fast_columns[k][next_fast])
            next_fast += 1
            out.lines.append(int(lines[i]))
            continue
        one = decode_chunk(
            RawChunk(chunk.file_index, int(lines[i]), lines=[chunk.lines[i]]), keys, json.loads
        )
        for texts in one.texts:
            for column, text in zip(columns, texts):
                column.append(text.encode("utf-8"))
        out.lines += one.lines
        out.malformed += one.malformed
    out.columns = [Utf8Batch.from_texts(column, valid_utf8=True) for column in columns]
    return out


def with_eod_reference(
    flat: np.ndarray, lengths: np.ndarray, eod: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy definition of `with_eod`: `flat` as `dtype` with `eod` after every document."""
    sizes = lengths + 1
    out = np.empty(int(flat.size + lengths.size), dtype=dtype)
    ends = np.cumsum(sizes) - 1  # (K,) where each document's EOD goes
    is_text = np.ones(out.size, dtype=bool)
    is_text[ends] = False
    out[is_text] = flat
    out[ends] = eod
    return out, sizes


def with_eod(
    flat: np.ndarray, lengths: np.ndarray, eod: int | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """`flat` (documents back to back, `lengths` ids each) as `dtype`, with `eod` after every
    document when it is not None; returns (tokens, tokens per document). One C++ pass (GIL released)
    for the tokenizers' id types, NumPy otherwise. Every id must fit `dtype` (the caller's vocabulary
    check guarantees it)."""
    dtype = np.dtype(dtype)
    if eod is None:
        return flat.astype(dtype, copy=False), lengths
    flat = np.ascontiguousarray(flat)
    if dtype.name in ("uint16", "int32") and flat.dtype in (np.uint32, np.int64):
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        return _fast.flatten_with_eod(flat, lengths, int(eod), dtype.name), lengths + 1
    return with_eod_reference(flat, lengths, eod, dtype)
