"""Stage 1, one task per input: which records are documents, and the LSH band keys of each.

A record is a document when the preprocessing run would keep it before dedup: well-formed, and
passing the same cleaning and quality rules (`cleaning.clean_record`, the function the preprocessing
workers call). Its MinHash signature is the in-process one (`dedup.MinHasher`, same shingles, same
values), computed for a whole chunk of documents at once (`MinHasher.signatures`), and cut into band
keys by `dedup.band_hashes`. Only the band keys are kept: 8 bytes per band per document, band-major
so that a bucket task reads its band as one contiguous slice of every input's file.

Memory stays bounded by one chunk: keys go to a temporary file as chunks are done and are
transposed into the band-major `.npy` block by block at the end.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from megatron_andromeda.preprocess.cleaning import CleaningConfig, clean_record
from megatron_andromeda.preprocess.dedup import band_hashes
from megatron_andromeda.preprocess.neardup.settings import NearDupSettings
from megatron_andromeda.preprocess.neardup.workdir import Plan, finish_file, save_npy, write_marker
from megatron_andromeda.preprocess.readers import RawChunk, decode_chunk, expand_inputs, read_chunks
from megatron_andromeda.preprocess.report import DropLog, InputHasher, malformed_total
from megatron_andromeda.preprocess.words import Words, split_words

_TRANSPOSE_ROWS = 1 << 20  # documents per block when writing the band-major keys


def document_words(record: tuple[str, ...], cleaning: CleaningConfig | None) -> Words | str:
    """The words MinHash sees for a record (its texts joined by newlines, as the preprocessing
    workers join them), or the quality rule that drops it."""
    words = None
    if cleaning is not None:
        record, split, reason = clean_record(record, cleaning)
        if reason is not None:
            return reason
        words = split[0] if len(split) == 1 else None
    if words is None:
        text = record[0] if len(record) == 1 else "\n".join(record)
        words = split_words(text.encode("utf-8"), text.isascii())
    return words


def chunk_band_keys(
    chunk: RawChunk, settings: NearDupSettings, drops: DropLog, path: str
) -> tuple[np.ndarray, np.ndarray]:
    """(lines (D,) int64, band keys (D, bands) uint64) of the chunk's documents; the records that
    are not documents go to `drops` with their reason."""
    decoded = decode_chunk(chunk, settings.json_keys, json.loads)
    for reason, line in decoded.malformed:
        drops.add(reason, path, line)
    words, lines = [], []
    for record, line in zip(decoded.texts, decoded.lines):
        result = document_words(record, settings.cleaning)
        if isinstance(result, str):
            drops.add(result, path, line)
        else:
            words.append(result)
            lines.append(line)
    signatures = settings.minhasher.signatures(words)  # (D, num_perm)
    return np.asarray(lines, dtype=np.int64), band_hashes(signatures, settings.bands, settings.rows)


def signature_task(plan: Plan, index: int) -> dict:
    """Signatures of input `index`; writes its keys, lines and marker, returns the marker."""
    start = time.perf_counter()
    settings = plan.settings
    spec = expand_inputs([plan.inputs[index]])[0]
    hasher = InputHasher([spec])
    drops = DropLog(max_samples=settings.max_samples)
    raw_path = plan.path("signatures", f"{index:05d}.keys.raw.tmp")
    lines, read = [], 0
    with open(raw_path, "wb") as raw:
        for chunk in read_chunks([spec], settings.json_keys):
            read += len(chunk)
            chunk_lines, keys = chunk_band_keys(chunk, settings, drops, spec.path)
            raw.write(np.ascontiguousarray(keys).tobytes())
            lines.append(chunk_lines)
    all_lines = np.concatenate(lines) if lines else np.zeros(0, dtype=np.int64)
    keys_record = _write_band_major(raw_path, plan.path("signatures", f"{index:05d}.keys.npy"),
                                    all_lines.size, settings.bands)  # fmt: skip
    lines_record = save_npy(plan.path("signatures", f"{index:05d}.lines.npy"), all_lines)
    source = hasher.result()[0]
    return write_marker(plan, "signatures", index, {
        "input": {"path": source["path"], "bytes": source["bytes"], "sha256": source["sha256"]},
        "documents": {"read": read, "kept": int(all_lines.size), "dropped": drops.total,
                      "malformed": malformed_total(drops)},
        "dropped": drops.as_dict(),
        "outputs": {"keys": keys_record, "lines": lines_record},
        "upstream": None,
        "seconds": round(time.perf_counter() - start, 3),
    })  # fmt: skip


def _write_band_major(raw_path: str, path: str, documents: int, bands: int) -> dict:
    """Turn the (documents, bands) keys in `raw_path` into a (bands, documents) `.npy` at `path`."""
    tmp = f"{path}.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint64, shape=(bands, documents))
    if documents:
        src = np.memmap(raw_path, dtype=np.uint64, mode="r", shape=(documents, bands))
        for first in range(0, documents, _TRANSPOSE_ROWS):
            out[:, first : first + _TRANSPOSE_ROWS] = src[first : first + _TRANSPOSE_ROWS].T
        del src
    out.flush()
    del out
    os.remove(raw_path)
    return finish_file(tmp, path)
