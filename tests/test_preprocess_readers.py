"""Input discovery, the streaming readers of every format, and malformed-record classification."""

import gzip
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megatron_andromeda.preprocess.readers import (
    InputError,
    RawChunk,
    decode_chunk,
    expand_inputs,
    file_sha256,
    read_chunks,
)

DOCS = [{"text": f"document number {i} " * (i + 1), "id": i} for i in range(40)]


def _write_jsonl(path, records, opener=open):
    with opener(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())


def _texts(files, keys=("text",), **kw):
    out = []
    for chunk in read_chunks(files, keys, **kw):
        decoded = decode_chunk(chunk, keys, json.loads)
        assert not decoded.malformed
        out.extend(t[0] for t in decoded.texts)
    return out


def test_expand_inputs_globs_sorted_deduplicated_and_classified(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.json.gz", "d.parquet", "e.jsonl.zst"):
        (tmp_path / name).write_bytes(b"")
    files = expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl"), str(tmp_path / "[cde]*")])
    assert [f.path.rsplit("/", 1)[1] for f in files] == [
        "a.jsonl",
        "b.jsonl",
        "c.json.gz",
        "d.parquet",
        "e.jsonl.zst",
    ]
    assert [(f.kind, f.compression) for f in files] == [
        ("jsonl", None), ("jsonl", None), ("jsonl", "gzip"), ("parquet", None), ("jsonl", "zstd"),
    ]  # fmt: skip


def test_expand_inputs_errors_name_the_input(tmp_path):
    with pytest.raises(InputError, match="nothing.jsonl"):
        expand_inputs([str(tmp_path / "nothing.jsonl")])
    with pytest.raises(InputError, match=r"\*.zzz.*matched nothing"):
        expand_inputs([str(tmp_path / "*.zzz")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt: unknown input format"):
        expand_inputs([str(tmp_path / "notes.txt")])
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(InputError, match="not a saved Hugging Face dataset"):
        expand_inputs([str(tmp_path / "plain_dir")])


@pytest.mark.parametrize("suffix,opener", [
    (".jsonl", open),
    (".jsonl.gz", gzip.open),
    (".jsonl.zst", lambda p, m: zstandard.open(p, m)),
])  # fmt: skip
def test_jsonl_formats_stream_in_bounded_chunks(tmp_path, suffix, opener):
    path = tmp_path / f"docs{suffix}"
    _write_jsonl(path, DOCS, opener)
    files = expand_inputs([str(path)])
    chunks = list(read_chunks(files, ["text"], chunk_bytes=200))
    assert len(chunks) > 5  # really chunked
    assert [c.first_line for c in chunks] == [1 + sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    assert _texts(files, chunk_bytes=200) == [d["text"] for d in DOCS]


def test_parquet_rows_and_bad_values(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"text": [d["text"] for d in DOCS[:5]] + [None], "id": list(range(6))})
    pq.write_table(table, path, row_group_size=4)
    files = expand_inputs([str(path)])
    chunks = list(read_chunks(files, ["text"], chunk_rows=3))
    decoded = [decode_chunk(c, ["text"], json.loads) for c in chunks]
    assert [t[0] for d in decoded for t in d.texts] == [d["text"] for d in DOCS[:5]]
    assert [m for d in decoded for m in d.malformed] == [("non_string", 6)]
    # a non-string column and a missing column are reported per row
    bad = list(read_chunks(files, ["id"], chunk_rows=10))
    assert decode_chunk(bad[0], ["id"], json.loads).malformed[0] == ("non_string", 1)
    missing = [
        m for c in read_chunks(files, ["body"]) for m in decode_chunk(c, ["body"], json.loads).malformed
    ]
    assert missing == [("missing_key", i) for i in range(1, 7)]


def test_binary_parquet_column_is_decoded_or_reported(tmp_path):
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9", b"\xff\xfe"], type=pa.binary())}), path)
    decoded = decode_chunk(next(read_chunks(expand_inputs([str(path)]), ["text"])), ["text"], json.loads)
    assert decoded.texts == [("café",)]
    assert decoded.malformed == [("invalid_utf8", 2)]


@pytest.mark.parametrize("name, module, package", [
    ("docs.jsonl.zst", "zstandard", "zstandard"),
    ("docs.parquet", "pyarrow.parquet", "pyarrow"),
])  # fmt: skip
def test_optional_format_libraries_missing_name_the_file(tmp_path, monkeypatch, name, module, package):
    (tmp_path / name).write_bytes(b"")
    files = expand_inputs([str(tmp_path / name)])
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(InputError, match=rf"{name}: .* needs the {package} package: pip install {package}"):
        list(read_chunks(files, ["text"]))


def test_saved_hf_dataset_needs_the_datasets_library(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    files = expand_inputs([str(tmp_path / "ds")])
    assert files[0].kind == "hf"
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(InputError, match="pip install datasets"):
        list(read_chunks(files, ["text"]))


def test_saved_hf_dataset_is_read_through_load_from_disk(tmp_path, monkeypatch):
    rows = [d["text"] for d in DOCS[:7]]

    class FakeDataset:  # the slice of datasets.Dataset the reader uses
        column_names = ["text", "id"]

        def select_columns(self, columns):
            assert columns == ["text"]
            return self

        def iter(self, batch_size):
            for start in range(0, len(rows), batch_size):
                yield {"text": rows[start : start + batch_size]}

    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    files = expand_inputs([str(tmp_path / "ds")])
    assert _texts(files, chunk_rows=3) == rows


def test_malformed_records_are_classified_with_their_line():
    lines = [
        b'{"text": "fine"}\n',
        b"\n",  # 2 empty line
        b'{"text": "caf\xe9"}\n',  # 3 invalid UTF-8 (latin-1 byte)
        b'{"text": "unterminated\n',  # 4 invalid JSON
        b'["text"]\n',  # 5 not an object
        b'{"body": "x"}\n',  # 6 missing key
        b'{"text": 42}\n',  # 7 non-string
        b'{"text": null}\n',  # 8 non-string
        b'{"text": "\\ud800 lone surrogate"}\n',  # 9 invalid Unicode
        b'{"text": "also fine", "extra": 1}',  # 10, no trailing newline
    ]
    decoded = decode_chunk(RawChunk(0, 1, lines=lines), ["text"], json.loads)
    assert decoded.texts == [("fine",), ("also fine",)]
    assert decoded.lines == [1, 10]
    assert decoded.malformed == [
        ("empty_line", 2), ("invalid_utf8", 3), ("invalid_json", 4), ("not_an_object", 5),
        ("missing_key", 6), ("non_string", 7), ("non_string", 8), ("invalid_utf8", 9),
    ]  # fmt: skip


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "x.jsonl"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(str(path)) == hashlib.sha256(b"abc" * 1000).hexdigest()
