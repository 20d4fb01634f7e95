"""Input discovery and streaming readers: JSONL (plain, .gz, .zst), Parquet and saved HF datasets.

Readers never parse JSON themselves: they cut the input into bounded `RawChunk`s (raw lines for JSONL,
column values for the columnar formats) that the worker processes decode. That keeps the main process
cheap and memory bounded by chunk size x chunks in flight, whatever the input size.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from megatron_andromeda.data.compressed import InputStream, compression_of, open_compressed, stream_errors
from megatron_andromeda.data.jsonl import InputError
from megatron_andromeda.data.sidecar import read_sidecar_file

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "jsonl" | "parquet" | "hf"
    compression: str | None = None  # "gzip" | "zstd" for JSONL

    @property
    def size(self) -> int:
        """Bytes on disk (a saved HF dataset counts all its files)."""
        if os.path.isdir(self.path):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.path) for f in fs)
        return os.path.getsize(self.path)


@dataclass
class RawChunk:
    """A slice of one input: `lines` (JSONL, undecoded) or `columns` (key -> values of `num_rows` rows).

    Record i of the chunk is line/row `first_line + i` (1-based) of `InputFile` number `file_index`.
    `missing_keys` lists requested keys that a columnar input does not have: every row lacks them.
    """

    file_index: int
    first_line: int
    lines: list[bytes] | None = None
    columns: dict[str, list] = field(default_factory=dict)
    num_rows: int = 0
    missing_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.lines) if self.lines is not None else self.num_rows


def _classify(path: str) -> InputFile:
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in HF_MARKERS):
            return InputFile(path, "hf")
        raise InputError(
            f"{path}: a directory that is not a saved Hugging Face dataset (no {' / '.join(HF_MARKERS)}); "
            "pass its files (or a glob such as 'dir/*.jsonl') instead"
        )
    name, compression = path.lower(), compression_of(path)
    if compression is not None:
        name = os.path.splitext(name)[0]
    if name.endswith(PARQUET_SUFFIXES) and compression is None:
        return InputFile(path, "parquet")
    if name.endswith(JSONL_SUFFIXES) or compression is not None:
        return InputFile(path, "jsonl", compression)
    raise InputError(
        f"{path}: unknown input format; expected JSONL ({', '.join(JSONL_SUFFIXES)}, optionally .gz/.zst), "
        f"Parquet ({', '.join(PARQUET_SUFFIXES)}) or a directory written by datasets.save_to_disk"
    )


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


# Files a preprocessing or merge run writes beside its datasets: never a corpus.
OUTPUT_SUFFIXES = (".bin", ".idx", ".digests", ".tmp")


def _earlier_output(path: str) -> str | None:
    """Why a glob match is an output of an earlier run (and so not an input), or None."""
    if path.endswith(OUTPUT_SUFFIXES):
        return "a dataset file"
    if path.lower().endswith(".json") and read_sidecar_file(path) is not None:
        return "the sidecar of a preprocessing run"
    return None


def expand_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Files named by `patterns` (paths or globs), in the given order, each glob sorted, no repeats.

    A glob never picks up the outputs of a run: sidecars (recognised by their content, not their
    name) and dataset files are left out with a note on stderr. A path named explicitly that is a
    sidecar is refused: it is the record of a run, not a corpus. (A corpus file that this run's
    outputs would replace is refused later, by `guards.check_inputs_untouched`.)
    """
    seen: set[str] = set()
    files: list[InputFile] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if _is_glob(pattern) else [pattern]
        if not matches or not os.path.exists(matches[0]):
            raise InputError(f"--input {pattern!r}: no such file (or the glob matched nothing)")
        if _is_glob(pattern):
            matches = _without_outputs(pattern, matches)
        elif read_sidecar_file(pattern) is not None:
            raise InputError(
                f"--input {pattern}: the sidecar of a tools/preprocess_data.py run (its record, not a "
                "corpus); leave it out of --input"
            )
        for path in matches:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(_classify(path))
    if not files:
        raise InputError("--input: no input files given")
    return files


def _without_outputs(pattern: str, matches: list[str]) -> list[str]:
    """The glob's matches less the outputs of preprocessing runs, which one line on stderr lists."""
    skipped = {path: why for path in matches if (why := _earlier_output(path)) is not None}
    if not skipped:
        return matches
    shown = ", ".join(f"{path} ({why})" for path, why in list(skipped.items())[:4])
    more = f" and {len(skipped) - 4} more" if len(skipped) > 4 else ""
    print(f"[preprocess] --input {pattern!r}: skipping outputs of preprocessing runs: {shown}{more}",
          file=sys.stderr)  # fmt: skip
    kept = [path for path in matches if path not in skipped]
    if not kept:
        raise InputError(
            f"--input {pattern!r}: matches only outputs of preprocessing runs ({shown}{more}); "
            "point it at the corpus files"
        )
    return kept


def file_sha256(path: str, block: int = 1 << 22) -> str:
    """sha256 of a file, or of a saved dataset directory's files in sorted order."""
    h = hashlib.sha256()
    paths = (
        sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        if os.path.isdir(path)
        else [path]
    )
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()


def _open_binary(spec: InputFile) -> InputStream:
    """The decompressed file; see data/compressed.py for why not zstandard's own stream reader."""
    try:
        return open_compressed(spec.path)
    except ImportError as e:
        message = f"{spec.path}: reading .zst needs the zstandard package: pip install zstandard"
        raise InputError(message) from e


def _jsonl_chunks(spec: InputFile, index: int, chunk_bytes: int) -> Iterator[RawChunk]:
    """Raw lines in bounded chunks; a compressed file that ends early or is damaged is an error
    naming the file and line, never a shorter corpus (its partial last line would read as one
    malformed record and the run would look complete)."""
    line_no = 1
    source = _open_binary(spec)
    with source.stream:
        while True:
            try:
                lines = source.stream.readlines(chunk_bytes)
            except stream_errors() as e:
                raise InputError(source.describe_error(e)) from e
            if not lines:
                return
            yield RawChunk(index, line_no, lines=lines)
            line_no += len(lines)


def open_records(spec: InputFile) -> Iterator[bytes]:
    """The raw lines of a JSONL input, one at a time (for a look at its first records)."""
    source = _open_binary(spec)
    with source.stream:
        yield from source.stream


def _parquet_chunks(spec: InputFile, index: int, keys: Sequence[str], rows: int) -> Iterator[RawChunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        message = f"{spec.path}: reading Parquet needs the pyarrow package: pip install pyarrow"
        raise InputError(message) from e

    try:
        pf = pq.ParquetFile(spec.path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{spec.path}: not a readable Parquet file ({e})") from e
    present = [k for k in keys if k in pf.schema_arrow.names]
    missing = tuple(k for k in keys if k not in present)
    row = 1
    # Without any requested column, read the first one anyway: every row must still be reported.
    batches = pf.iter_batches(batch_size=rows, columns=present or pf.schema_arrow.names[:1])
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group: ArrowInvalid, OSError, ...
            message = f"{spec.path}: unreadable after row {row - 1:,} ({e}); the file is damaged"
            raise InputError(message) from e
        if batch is None:
            return
        columns = {k: batch.column(k).to_pylist() for k in present}
        yield RawChunk(index, row, columns=columns, num_rows=batch.num_rows, missing_keys=missing)
        row += batch.num_rows


def _hf_chunks(spec: InputFile, index: int, keys: Sequence[str], rows: int) -> Iterator[RawChunk]:
    try:
        import datasets
    except ImportError as e:
        raise InputError(
            f"{spec.path}: reading a saved Hugging Face dataset needs the datasets library: "
            "pip install datasets (or export it to JSONL/Parquet with dataset.to_json / to_parquet)"
        ) from e
    ds = datasets.load_from_disk(spec.path)
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise InputError(
            f"{spec.path}: a DatasetDict with splits {sorted(ds.keys())}; pass one split's directory, "
            f"e.g. {os.path.join(spec.path, sorted(ds.keys())[0])}"
        )
    present = [k for k in keys if k in ds.column_names]
    missing = tuple(k for k in keys if k not in present)
    row = 1
    for batch in ds.select_columns(present or ds.column_names[:1]).iter(batch_size=rows):
        n = len(next(iter(batch.values())))
        columns = {k: batch[k] for k in present}
        yield RawChunk(index, row, columns=columns, num_rows=n, missing_keys=missing)
        row += n


def read_chunks(
    files: Sequence[InputFile], keys: Sequence[str], chunk_bytes: int = 1 << 21, chunk_rows: int = 512
) -> Iterator[RawChunk]:
    """All records of all `files`, in order, as bounded chunks."""
    for index, spec in enumerate(files):
        if spec.kind == "jsonl":
            yield from _jsonl_chunks(spec, index, chunk_bytes)
        elif spec.kind == "parquet":
            yield from _parquet_chunks(spec, index, keys, chunk_rows)
        else:
            yield from _hf_chunks(spec, index, keys, chunk_rows)


# ----------------------------------------------------------------------------------------- decoding
MALFORMED_REASONS = (
    "empty_line",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_key",
    "non_string",
)


@dataclass
class DecodedChunk:
    """The well-formed records of a chunk (one text per key) and what was wrong with the others."""

    texts: list[tuple[str, ...]]
    lines: list[int]  # 1-based line/row of each record in its file
    malformed: list[tuple[str, int]]  # (reason, line)


def _check_text(value: object) -> str | None:
    """The malformed-reason of one field value, or None when it is usable text."""
    if isinstance(value, bytes):  # binary Parquet/Arrow columns
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
    if not isinstance(value, str):
        return "non_string"
    try:  # lone surrogates (JSON "\\ud800" escapes) cannot reach the tokenizer
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8"
    return None


def _decode_line(line: bytes, keys: Sequence[str], loads) -> tuple[str, ...] | str:
    """The texts of one JSONL line, or the reason it is malformed."""
    if not line.strip():
        return "empty_line"
    try:
        obj = loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "invalid_utf8"
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; RecursionError: deep nesting
        return "invalid_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    texts = []
    for key in keys:
        if key not in obj:
            return "missing_key"
        value = obj[key]
        reason = _check_text(value)
        if reason is not None:
            return reason
        texts.append(value.decode("utf-8") if isinstance(value, bytes) else value)
    return tuple(texts)


def decode_chunk(chunk: RawChunk, keys: Sequence[str], loads) -> DecodedChunk:
    """Split a raw chunk into well-formed records and (reason, line) pairs for the others."""
    out = DecodedChunk([], [], [])
    if chunk.lines is not None:
        for i, line in enumerate(chunk.lines):
            result = _decode_line(line, keys, loads)
            if isinstance(result, str):
                out.malformed.append((result, chunk.first_line + i))
            else:
                out.texts.append(result)
                out.lines.append(chunk.first_line + i)
        return out
    if chunk.missing_keys:
        out.malformed.extend(("missing_key", chunk.first_line + i) for i in range(len(chunk)))
        return out
    for i, values in enumerate(zip(*(chunk.columns[k] for k in keys))):
        reasons = [r for r in map(_check_text, values) if r is not None]
        if reasons:
            out.malformed.append((reasons[0], chunk.first_line + i))
        else:
            out.texts.append(tuple(v.decode("utf-8") if isinstance(v, bytes) else v for v in values))
            out.lines.append(chunk.first_line + i)
    return out
