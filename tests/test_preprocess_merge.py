"""Merging preprocessing runs made on separate machines (tools/merge_datasets.py)."""

import filecmp
import json

import numpy as np
import pytest
from test_preprocess_pipeline import config, prose, tokenizer_path, write_jsonl  # noqa: F401 (fixture)
from tool_loader import load_tool

from megatron_andromeda.data.indexed_dataset import (
    DatasetError,
    IndexedDataset,
    IndexedDatasetWriter,
    data_file_path,
    index_file_path,
)
from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.merge import merge_datasets, merge_runs
from megatron_andromeda.preprocess.pipeline import run

SPLIT = (0.6, 0.2, 0.2)


def three_files(tmp_path):
    return [
        write_jsonl(tmp_path / f"part{p}.jsonl", [prose(100 * p + i, 40) for i in range(60)] + ["short"])
        for p in range(3)
    ]


def same_bytes(a: str, b: str) -> bool:
    return all(filecmp.cmp(path(a), path(b), shallow=False) for path in (data_file_path, index_file_path))


def test_merged_runs_equal_one_run_over_every_file(tmp_path, tokenizer_path):  # noqa: F811
    files = three_files(tmp_path)
    cleaning = CleaningConfig(min_words=5)
    whole = run(config(tmp_path / "whole", files, tokenizer_path, split=SPLIT, cleaning=cleaning))
    parts = []
    for p, path in enumerate(files):  # one run per machine, each on its own file
        run(config(tmp_path / f"machine{p}", [path], tokenizer_path, split=SPLIT, cleaning=cleaning))
        parts.append(str(tmp_path / f"machine{p}" / "out" / "corpus"))
    merged = merge_runs(parts, str(tmp_path / "merged" / "corpus"))

    assert list(merged["outputs"]) == list(whole["outputs"]) == ["train/text", "valid/text", "test/text"]
    for name, out in merged["outputs"].items():
        assert same_bytes(out["prefix"], whole["outputs"][name]["prefix"]), name
        assert (out["documents"], out["tokens"]) == (
            whole["outputs"][name]["documents"],
            whole["outputs"][name]["tokens"],
        )
    assert (
        merged["documents"] == whole["documents"] == {"read": 183, "kept": 180, "dropped": 3, "malformed": 0}
    )
    assert merged["dropped"]["too_few_words"]["count"] == 3 and merged["tokens"] == whole["tokens"]
    assert [i["sha256"] for i in merged["inputs"]] == [i["sha256"] for i in whole["inputs"]]
    assert merged["dedup_scope"] == "per run" and len(merged["merged_from"]) == 3
    with open(tmp_path / "merged" / "corpus.json") as f:
        assert json.load(f) == merged


def test_exact_duplicates_across_runs_are_dropped_as_one_run_would(tmp_path, tokenizer_path):  # noqa: F811
    texts = [[prose(100 * p + i, 40) for i in range(40)] for p in range(3)]
    texts[1][5] = texts[0][3]  # across files 0 and 1
    texts[2][7] = texts[0][3].upper()  # the digest folds case
    texts[2][9] = texts[1][20]
    texts[2][11] = texts[2][10]  # within one file: the run itself drops it
    files = [write_jsonl(tmp_path / f"part{p}.jsonl", t) for p, t in enumerate(texts)]
    whole = run(config(tmp_path / "whole", files, tokenizer_path, split=SPLIT, exact_dedup=True))
    parts = []
    for p, path in enumerate(files):
        run(config(tmp_path / f"machine{p}", [path], tokenizer_path, split=SPLIT, exact_dedup=True))
        parts.append(str(tmp_path / f"machine{p}" / "out" / "corpus"))
    merged = merge_runs(parts, str(tmp_path / "merged" / "corpus"))

    assert whole["dropped"]["exact_duplicate"]["count"] == 4
    assert merged["documents"] == whole["documents"]
    assert (
        merged["dropped"]["exact_duplicate"]["count"] == 4 and merged["dedup_scope"] == "exact: across runs"
    )
    for name, out in merged["outputs"].items():
        assert same_bytes(out["prefix"], whole["outputs"][name]["prefix"]), name
        assert filecmp.cmp(out["digests"], whole["outputs"][name]["digests"], shallow=False), name
    # A merged run merges again (its digests are kept): nothing new is dropped.
    again = merge_runs([str(tmp_path / "merged" / "corpus")], str(tmp_path / "again" / "corpus"))
    assert again["documents"] == merged["documents"]


def test_runs_with_other_settings_are_refused(tmp_path, tokenizer_path):  # noqa: F811
    files = three_files(tmp_path)
    run(config(tmp_path / "a", files[:1], tokenizer_path, split=SPLIT))
    run(config(tmp_path / "b", files[1:2], tokenizer_path, split=(0.5, 0.5, 0.0)))
    mismatch = r"b/out/corpus.json: options.split is \[0.5, 0.5, 0.0\] but .*a/out/corpus.json has"
    with pytest.raises(DatasetError, match=mismatch):
        merge_runs([str(tmp_path / "a/out/corpus"), str(tmp_path / "b/out/corpus")], str(tmp_path / "m"))
    with pytest.raises(DatasetError, match="no preprocessing sidecar"):
        merge_runs([str(tmp_path / "a/out/corpus"), str(tmp_path / "nowhere")], str(tmp_path / "m"))
    assert not list(tmp_path.glob("m*")), "a refused merge wrote something"


def write_dataset(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for sequences in documents:
            writer.add_document_sequences([np.asarray(s) for s in sequences])
    return str(prefix)


def test_plain_datasets_concatenate_documents_and_sequences(tmp_path):
    a = [[[1, 2, 3]], [[4], [5, 6]]]
    b = [[[]], [[7, 8]]]
    pa, pb = write_dataset(tmp_path / "a", a), write_dataset(tmp_path / "b", b)
    merged = merge_datasets([pa, pb], str(tmp_path / "ab"))
    assert same_bytes(str(tmp_path / "ab"), write_dataset(tmp_path / "direct", a + b))
    assert merged.num_documents == 4 and [merged[i].tolist() for i in range(len(merged))] == [
        [1, 2, 3], [4], [5, 6], [], [7, 8],
    ]  # fmt: skip
    write_dataset(tmp_path / "wide", a, dtype=np.int32)
    with pytest.raises(DatasetError, match="wide: tokens are int32"):
        merge_datasets([pa, str(tmp_path / "wide")], str(tmp_path / "bad"))
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.tmp").exists()
    with pytest.raises(DatasetError, match="would overwrite one of the inputs"):
        merge_datasets([pa, pb], pa)


def test_merge_tool(tmp_path, tokenizer_path, capsys):  # noqa: F811
    files = three_files(tmp_path)
    for p in range(2):
        run(config(tmp_path / f"m{p}", [files[p]], tokenizer_path, split=SPLIT))
    tool = load_tool("merge_datasets")
    sidecars = [str(tmp_path / f"m{p}" / "out" / "corpus.json") for p in range(2)]
    assert tool.main(["--input", *sidecars, "--output-prefix", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert "all_train_text_document" in out and "merged from 2 runs" in out
    assert IndexedDataset(str(tmp_path / "all_valid_text_document")).num_documents > 0
    assert tool.main(["--datasets", str(tmp_path / "nothing"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "merge_datasets.py: error:" in capsys.readouterr().err
