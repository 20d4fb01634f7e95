"""JSONL chunks decoded in C++ (`_fast.decode_jsonl_texts`, GIL released), exactly as
`readers.decode_chunk` with `json.loads` decodes them.

Decoding JSON in Python costs about half as much CPU as gigatoken's encoding of the same text, so it
would dominate the fast path. The C++ scanner takes only the lines it can decode exactly: valid
UTF-8, strict JSON, one object whose requested keys all hold strings without lone surrogates. It
hands back None for any other line (malformed, unusual or just outside its strict subset: NaN,
huge integers, deep nesting), and those go through `readers.decode_chunk` one by one, which counts
and names whatever is wrong with them. Same texts, same lines, same malformed reasons, in the same
order; `tests/test_preprocess_fast.py` holds the two equal on adversarial lines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

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


def decode_chunk_fast(chunk: RawChunk, keys: Sequence[str]) -> DecodedChunk:
    """`decode_chunk(chunk, keys, json.loads)`, with JSONL lines scanned in C++ where it is exact."""
    if chunk.lines is None or not _encodable(keys):
        return decode_chunk(chunk, keys, json.loads)
    out = DecodedChunk([], [], [])
    for i, texts in enumerate(_fast.decode_jsonl_texts(chunk.lines, list(keys))):
        line = chunk.first_line + i
        if texts is not None:
            out.texts.append(texts)
            out.lines.append(line)
            continue
        one = decode_chunk(RawChunk(chunk.file_index, line, lines=[chunk.lines[i]]), keys, json.loads)
        out.texts += one.texts
        out.lines += one.lines
        out.malformed += one.malformed
    return out
