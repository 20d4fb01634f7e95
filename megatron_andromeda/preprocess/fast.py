"""Typed wrappers of the C++ hot loops in csrc/preprocess_fast.cpp (`_fast`, built at install time).

`decode_chunk_utf8`: JSONL chunks decoded in C++ (GIL released) into UTF-8 bytes, exactly as
`readers.decode_chunk` with `json.loads` decodes them (then encoded to UTF-8). Decoding JSON in
Python costs about half as much CPU as gigatoken's encoding of the same text, so it would dominate
the fast path; and gigatoken encodes UTF-8 bytes faster than `str` (no conversion back to UTF-8),
so texts stay bytes until a rule needs `str`. The C++ scanner takes only the lines it can decode
exactly: valid UTF-8, strict JSON, one object whose requested keys all hold strings without lone
surrogates. It hands back None for any other line (malformed, unusual or just outside its strict
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

import numpy as np

from megatron_andromeda.preprocess.readers import DecodedChunk, RawChunk, decode_chunk

try:
    from megatron_andromeda.preprocess import _fast
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "the C++ extension megatron_andromeda.preprocess._fast is missing or stale; rebuild it with "
        "`pip install --no-build-isolation -e .` from the repository root"
    ) from e


def _encodable(keys: Sequence[str]) -> bool:
    try:
        for key in keys:
            key.encode("utf-8")
    except UnicodeEncodeError:  # a key with lone surrogates (from a mis-decoded command line)
        return False
    return True


def _as_utf8(decoded: DecodedChunk) -> DecodedChunk:
    decoded.texts = [tuple(t.encode("utf-8") for t in texts) for texts in decoded.texts]
    return decoded


def decode_chunk_utf8(chunk: RawChunk, keys: Sequence[str]) -> DecodedChunk:
    """`decode_chunk(chunk, keys, json.loads)` with every text as UTF-8 bytes; JSONL lines are
    scanned in C++ where that is exact, the rest (and columnar chunks) decoded in Python."""
    if chunk.lines is None or not _encodable(keys):
        return _as_utf8(decode_chunk(chunk, keys, json.loads))
    out = DecodedChunk([], [], [])
    for i, texts in enumerate(_fast.decode_jsonl_texts(chunk.lines, list(keys))):
        line = chunk.first_line + i
        if texts is not None:
            out.texts.append(texts)
            out.lines.append(line)
            continue
        one = decode_chunk(RawChunk(chunk.file_index, line, lines=[chunk.lines[i]]), keys, json.loads)
        out.texts += _as_utf8(one).texts
        out.lines += one.lines
        out.malformed += one.malformed
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
