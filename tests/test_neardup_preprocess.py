"""Stage 4: preprocessing runs apply a near-dup run's drop lists; runs on separate machines merge into
what one run over everything writes, byte for byte."""

import filecmp
import json
from pathlib import Path

import pytest
from test_neardup import near
from test_preprocess_pipeline import config, prose, tokenizer_path, write_jsonl  # noqa: F401 (fixture)

from megatron_andromeda.data.indexed_dataset import DatasetError, data_file_path, index_file_path
from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.cli import main as preprocess_main
from megatron_andromeda.preprocess.dedup import MinHasher
from megatron_andromeda.preprocess.merge import merge_runs
from megatron_andromeda.preprocess.neardup.runner import run_all
from megatron_andromeda.preprocess.neardup.settings import NearDupSettings
from megatron_andromeda.preprocess.neardup.workdir import NearDupError, init_plan
from megatron_andromeda.preprocess.pipeline import run

SPLIT = (0.6, 0.2, 0.2)
CLEANING = CleaningConfig(min_words=20)


def corpus(tmp_path):
    """Three files: near-duplicates across them, an exact duplicate, and records cleaning drops."""
    texts = [[prose(100 * p + i, 150) for i in range(15)] + ["far too short"] for p in range(3)]
    texts[1][4] = near(texts[0][2], 1)
    texts[2][6] = near(texts[0][2], 2)
    texts[2][8] = near(texts[1][9], 3)
    texts[2][11] = texts[0][7]  # an exact duplicate is a near-duplicate too: the drop list has it
    files = [write_jsonl(tmp_path / f"part{p}.jsonl", t) for p, t in enumerate(texts)]
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(Path(f).read_text() for f in files))
    return files, str(whole)


def near_dup_run(work_dir, inputs, cleaning=CLEANING):
    plan = init_plan(str(work_dir), inputs, NearDupSettings(cleaning=cleaning))
    run_all(plan, log=False)
    return plan.work_dir


def preprocess(out_dir, inputs, tokenizer, near_dup_dir, **kw):
    options = dict(split=SPLIT, cleaning=CLEANING, exact_dedup=True, near_dup_dir=near_dup_dir)
    return run(config(out_dir, inputs, tokenizer, **{**options, **kw}))


def same_bytes(a: str, b: str) -> bool:
    return all(filecmp.cmp(path(a), path(b), shallow=False) for path in (data_file_path, index_file_path))


def test_runs_per_machine_merge_into_one_run_byte_for_byte(tmp_path, tokenizer_path):  # noqa: F811
    files, whole = corpus(tmp_path)
    single = preprocess(tmp_path / "single", [whole], tokenizer_path, near_dup_run(tmp_path / "nd1", [whole]))
    nd3 = near_dup_run(tmp_path / "nd3", files)
    parts = []
    for p, path in enumerate(files):  # one machine per file, each with the drop lists of all three
        preprocess(tmp_path / f"machine{p}", [path], tokenizer_path, nd3)
        parts.append(str(tmp_path / f"machine{p}" / "out" / "corpus"))
    merged = merge_runs(parts, str(tmp_path / "merged" / "corpus"))

    assert single["dropped"]["near_duplicate"]["count"] == merged["dropped"]["near_duplicate"]["count"] == 4
    assert single["dropped"]["near_duplicate"]["samples"] == [f"{whole}:{n}" for n in (21, 39, 41, 44)]
    assert "exact_duplicate" not in merged["dropped"] and merged["dropped"]["too_few_words"]["count"] == 3
    assert (
        merged["documents"] == single["documents"] == {"read": 48, "kept": 41, "dropped": 7, "malformed": 0}
    )
    for name, out in merged["outputs"].items():
        assert same_bytes(out["prefix"], single["outputs"][name]["prefix"]), name
    run_id = json.loads(Path(nd3, "plan.json").read_text())["run_id"]
    assert merged["dedup_scope"] == f"exact: across runs; near: across near-dup run {run_id}"
    assert single["options"]["near_dup"]["dropped"] == 4 and single["options"]["near_dup"]["clusters"] == 3

    # Without the near-dup run, each machine finds only its own near-duplicates: three stay.
    for p, path in enumerate(files):
        preprocess(tmp_path / f"alone{p}", [path], tokenizer_path, None, minhash=MinHasher())
    alone = merge_runs(
        [str(tmp_path / f"alone{p}" / "out" / "corpus") for p in range(3)], str(tmp_path / "al")
    )
    assert alone["documents"]["kept"] == single["documents"]["kept"] + 3  # the exact one is caught


def test_preprocessing_refuses_drop_lists_that_do_not_fit(tmp_path, tokenizer_path, capsys):  # noqa: F811
    files, whole = corpus(tmp_path)
    unfinished = str(tmp_path / "unfinished")
    init_plan(unfinished, files, NearDupSettings(cleaning=CLEANING))
    with pytest.raises(NearDupError, match=r"unfinished/signatures/00000.json: stage 'signatures' has not"):
        preprocess(tmp_path / "o", files, tokenizer_path, unfinished)
    nd = near_dup_run(tmp_path / "nd", files)
    with pytest.raises(
        NearDupError, match=r"cleaned with other rules \(cleaning.min_words is 50, expected 20"
    ):
        preprocess(tmp_path / "o", files, tokenizer_path, nd, cleaning=CleaningConfig())
    with pytest.raises(NearDupError, match=r"cleaning is on there but off \(--no-clean\) here"):
        preprocess(tmp_path / "o", files, tokenizer_path, nd, cleaning=None)
    with pytest.raises(NearDupError, match=rf"{whole}: not an input of the near-dup run"):
        preprocess(tmp_path / "o", [whole], tokenizer_path, nd)
    with pytest.raises(NearDupError, match=r"--json-keys \['body'\]: the near-dup run .* read \['text'\]"):
        preprocess(tmp_path / "o", files, tokenizer_path, nd, json_keys=("body",))
    with pytest.raises(ValueError, match="switch the in-process MinHash off"):
        preprocess(tmp_path / "o", files, tokenizer_path, nd, minhash=MinHasher())

    changed = Path(files[1]).read_text().replace("a", "e", 1)  # same size, other content
    Path(files[1]).write_text(changed)
    with pytest.raises(
        NearDupError, match=rf"{files[1]}: content sha256 .* differs from what the near-dup run"
    ):
        preprocess(tmp_path / "o", files, tokenizer_path, nd)
    assert not list((tmp_path / "o" / "out").glob("*")), "a refused run left files behind"
    Path(files[1]).write_text(changed + "\n")
    argv = ["--input", files[1], "--output-prefix", str(tmp_path / "cli" / "c"),
            "--tokenizer", tokenizer_path, "--near-dup-dir", nd, "--min-words", "20"]  # fmt: skip
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert "preprocess_data.py: error:" in err and "the near-dup run" in err and "rerun near-dup" in err


def test_merge_refuses_runs_deduplicated_against_different_near_dup_runs(tmp_path, tokenizer_path):  # noqa: F811
    files, _ = corpus(tmp_path)
    a, b = near_dup_run(tmp_path / "a", files), near_dup_run(tmp_path / "b", files[:2])
    preprocess(tmp_path / "m0", files[:1], tokenizer_path, a)
    preprocess(tmp_path / "m1", files[1:2], tokenizer_path, b)
    with pytest.raises(DatasetError, match=r"m1/out/corpus.json: options.near_dup.run_id is '\w+' but"):
        merge_runs([str(tmp_path / "m0/out/corpus"), str(tmp_path / "m1/out/corpus")], str(tmp_path / "x"))
