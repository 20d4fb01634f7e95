"""`tools/preprocess_data.py` never destroys data nor passes off an empty or partial result.

Each test runs the documented command as a subprocess on a few hundred small documents: inputs are
never deleted, earlier runs survive reruns and failed runs, a cut .gz/.zst is an error naming the
file, and a run that keeps nothing fails naming the keys its records have (issue 21 section 5,
issue 20 item 2).
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from hang_guard import HANG_GUARD_S
from test_preprocess_pipeline import prose
from tiny_tokenizer import train_tiny_tokenizer

from megatron_andromeda.data.compressed import open_compressed

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "preprocess_data.py"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tiny_tokenizer(path, [prose(i) for i in range(30)])


def preprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), "--workers", "0", "--no-clean", "--no-dedup", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def corpus(path: Path, n: int = 60, key: str = "text") -> bytes:
    data = "".join(json.dumps({key: prose(i, words=40)}) + "\n" for i in range(n)).encode()
    path.write_bytes(data)
    return data


def run_files(directory: Path) -> dict[str, bytes]:
    """Every file of a directory with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_input_that_an_output_would_replace_is_refused_and_untouched(tmp_path, tokenizer_path):
    data = corpus(tmp_path / "X.json")
    result = preprocess(
        "--input", "X.json", "--output-prefix", "X", "--tokenizer", tokenizer_path, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "--output-prefix X" in result.stderr and "--input X.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "X.json").read_bytes() == data  # the corpus is intact ...
    assert sorted(os.listdir(tmp_path)) == ["X.json"]  # ... and nothing was written beside it
    result = preprocess("--input", "X*", "--output-prefix", "X", "--tokenizer", tokenizer_path, cwd=tmp_path)
    assert result.returncode == 2 and (tmp_path / "X.json").read_bytes() == data  # a glob too


def test_rerun_with_a_glob_skips_the_earlier_sidecar_and_keeps_its_datasets(tmp_path, tokenizer_path):
    (tmp_path / "dir").mkdir()
    corpus(tmp_path / "dir" / "a.json")
    args = ["--input", "dir/*.json", "--tokenizer", tokenizer_path, "--split", "80,20"]
    first = preprocess(*args, "--output-prefix", "dir/out", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = run_files(tmp_path / "dir")
    sidecar = json.loads(before["out.json"])
    assert sidecar["documents"]["read"] == 60

    # the same command again: the glob now also matches dir/out.json, the first run's sidecar
    again = preprocess(*args, "--output-prefix", "dir/out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "skipping" in again.stderr and "dir/out.json" in again.stderr
    after = run_files(tmp_path / "dir")
    assert {k: v for k, v in after.items() if k != "out.json"} == {
        k: v for k, v in before.items() if k != "out.json"
    }  # the same datasets, byte for byte: the sidecar was not read as a corpus
    assert json.loads(after["out.json"])["documents"]["read"] == 60

    # a rerun that fails (no record has the key) leaves the earlier run complete and untouched
    failed = preprocess(*args, "--output-prefix", "dir/out", "--json-keys", "content", cwd=tmp_path)
    assert failed.returncode == 2
    assert run_files(tmp_path / "dir") == after


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def damaged(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return bytes(flipped)


@pytest.mark.parametrize(
    "name,make",
    [
        ("cut.json.zst", lambda raw: cut(zstandard.ZstdCompressor().compress(raw), 0.9)),
        ("cut.json.gz", lambda raw: cut(gzip.compress(raw), 0.6)),
        ("bad.json.gz", lambda raw: damaged(gzip.compress(raw))),
    ],
)
def test_truncated_or_damaged_compressed_input_is_an_error_naming_the_file(
    tmp_path, tokenizer_path, name, make
):
    raw = corpus(tmp_path / "plain.json", n=300)
    (tmp_path / name).write_bytes(make(raw))
    out = tmp_path / "out"
    result = preprocess(
        "--input", name, "--output-prefix", out / "c", "--tokenizer", tokenizer_path, cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{name}: the compressed data" in result.stderr
    assert ("ends early" if name.startswith("cut") else "is damaged") in result.stderr
    assert "after line" in result.stderr and "compressed byte" in result.stderr
    assert not out.exists() or os.listdir(out) == []  # nothing that looks complete


def test_complete_multi_frame_and_multi_member_files_read_in_full(tmp_path):
    """The frame-by-frame reader must not stop at the first zstd frame or gzip member."""
    data = b"".join(b'{"text": "line %d"}\n' % i for i in range(5000))
    half = data.index(b"\n", len(data) // 2) + 1
    zc = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(zc.compress(data[:half]) + zc.compress(data[half:]))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]) + b"\0\0")
    for name in ("a.jsonl.zst", "a.jsonl.gz"):
        source = open_compressed(tmp_path / name)
        with source.stream:
            assert source.stream.read() == data
        assert source.frames.newlines == 5000


def test_keys_missing_from_every_record_fail_naming_the_keys_present(tmp_path, tokenizer_path):
    corpus(tmp_path / "body.jsonl", key="body")
    out = tmp_path / "out"
    result = preprocess(
        "--input", "body.jsonl", "--json-keys", "content", "--output-prefix", out / "b",
        "--tokenizer", tokenizer_path, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert "kept none of the 60 records" in result.stderr and "missing_key 60" in result.stderr
    assert "--json-keys content" in result.stderr and "['body']" in result.stderr
    assert not out.exists() or os.listdir(out) == []


def test_empty_split_is_written_with_a_warning(tmp_path, tokenizer_path):
    corpus(tmp_path / "small.jsonl", n=5)
    out = tmp_path / "out"
    args = ["--input", "small.jsonl", "--output-prefix", out / "s", "--tokenizer", tokenizer_path]
    result = preprocess(*args, "--split", "98,1,1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "s.json").read_text())
    empty = [name for name, o in report["outputs"].items() if o["documents"] == 0]
    assert empty  # 5 documents at 1%: valid and test get none
    for name in empty:
        split = name.split("/")[0]
        assert f"warning: {out}/s_{split}_text_document is empty" in result.stderr
    assert "train_text_document is empty" not in result.stderr
