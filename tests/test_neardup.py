"""Near-dup stages (tools/neardup.py): signatures, buckets, union-find, restarts, the report, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_preprocess_pipeline import prose, tokenizer_path, write_jsonl  # noqa: F401 (fixture)

from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.dedup import MinHasher, band_hashes
from megatron_andromeda.preprocess.neardup.buckets import candidate_pairs
from megatron_andromeda.preprocess.neardup.cli import main
from megatron_andromeda.preprocess.neardup.clusters import cluster_pairs
from megatron_andromeda.preprocess.neardup.runner import run_all, run_stage
from megatron_andromeda.preprocess.neardup.settings import NearDupSettings
from megatron_andromeda.preprocess.neardup.workdir import NearDupError, init_plan, load_plan
from megatron_andromeda.preprocess.words import split_words

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = NearDupSettings(cleaning=None)


def near(text: str, seed: int) -> str:
    """`text` with one word replaced: Jaccard ~0.95 on 150 words."""
    words = text.split(" ")
    words[random.Random(seed).randrange(len(words))] = "zzzz"
    return " ".join(words)


def corpus_files(tmp_path, parts=3, per_part=12):
    """`parts` files of prose; documents 2 and 5 of file 0 reappear (one word changed) later."""
    texts = [[prose(100 * p + i, 150) for i in range(per_part)] for p in range(parts)]
    texts[-1][3] = near(texts[0][2], 1)
    texts[min(1, parts - 1)][7] = near(texts[0][5], 2)
    texts[-1][9] = near(texts[0][5], 3)  # a cluster of three across three files
    return [write_jsonl(tmp_path / f"part{p}.jsonl", t) for p, t in enumerate(texts)]


def drop_lines(plan) -> list[list[int]]:
    return [np.load(plan.path("clusters", f"{i:05d}.drop.npy")).tolist() for i in range(len(plan.inputs))]


def test_batched_signatures_equal_the_per_document_minhash():
    rng = random.Random(0)
    texts = [prose(i, rng.randint(1, 400)) for i in range(40)] + ["", "one", "a b c d", "x " * 9]
    words = [split_words(t.encode()) for t in texts]
    hasher = MinHasher()
    batch = hasher.signatures(words)
    assert np.array_equal(batch, np.stack([hasher.signature(w) for w in words]))
    assert np.array_equal(band_hashes(batch, *hasher.bands), np.stack([hasher.band_keys(w) for w in words]))


def test_stage_band_keys_equal_the_preprocessing_workers(tmp_path, tokenizer_path):  # noqa: F811
    """The signature stage sees the same documents and keys as the preprocessing workers."""
    from megatron_andromeda.preprocess.neardup.signatures import chunk_band_keys
    from megatron_andromeda.preprocess.processor import ChunkProcessor, ProcessorSettings
    from megatron_andromeda.preprocess.readers import expand_inputs, read_chunks
    from megatron_andromeda.preprocess.report import DropLog

    cleaning = CleaningConfig(min_words=30)
    records = [{"a": prose(i, 60 if i % 4 else 10), "b": prose(50 + i, 40)} for i in range(30)]
    path = tmp_path / "two_keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    hasher = MinHasher()
    settings = NearDupSettings(
        bands=hasher.bands[0], rows=hasher.bands[1], json_keys=("a", "b"), cleaning=cleaning
    )
    chunk = next(read_chunks(expand_inputs([str(path)]), ("a", "b")))
    lines, keys = chunk_band_keys(chunk, settings, DropLog(), str(path))
    worker = ChunkProcessor(
        ProcessorSettings(tokenizer_path, ("a", "b"), "uint16", False, cleaning, False, hasher, None)
    )
    result = worker(chunk)
    assert lines.tolist() == result.lines.tolist() and 0 < lines.size < len(records)
    assert np.array_equal(keys, result.band_keys)


def reference_roots(pairs, n):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_union_find_keeps_the_lowest_member_of_each_component(seed):
    rng = np.random.default_rng(seed)
    n = 400
    pairs = rng.integers(0, n, size=(300, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    blocks = [pairs[:100], pairs[100:]]  # two "pair files"
    members, roots = cluster_pairs(blocks)
    expected = reference_roots(pairs.tolist(), n)
    assert members.tolist() == sorted(set(pairs.ravel().tolist()))
    assert roots.tolist() == [expected[m] for m in members]


def test_candidate_pairs_link_each_bucket_to_its_first_member():
    keys = np.array([7, 3, 7, 9, 3, 7, 5], dtype=np.uint64)
    assert sorted(map(tuple, candidate_pairs(keys).tolist())) == [(0, 2), (0, 5), (1, 4)]
    assert candidate_pairs(np.zeros(0, dtype=np.uint64)).shape == (0, 2)
    keys = np.random.default_rng(0).integers(0, 40, size=500).astype(np.uint64)  # buckets of all sizes
    expected = []
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key).tolist()
        expected += [(members[0], m) for m in members[1:]]
    assert sorted(map(tuple, candidate_pairs(keys).tolist())) == sorted(expected)


def test_one_and_three_inputs_drop_the_same_documents(tmp_path):
    files = corpus_files(tmp_path)
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(Path(f).read_text() for f in files))
    one = init_plan(str(tmp_path / "w1"), [str(whole)], SETTINGS)
    three = init_plan(str(tmp_path / "w3"), files, SETTINGS)
    run_all(one, log=False)
    run_all(three, workers=2, log=False)
    per_file = [line for f, lines in enumerate(drop_lines(three)) for line in [12 * f + x for x in lines]]
    assert drop_lines(one) == [per_file] == [[12 * 1 + 8, 12 * 2 + 4, 12 * 2 + 10]]
    report = json.loads(Path(three.marker_path("clusters", 0)).read_text())
    assert report["documents"] == {"read": 36, "not_documents": 0, "in": 36, "in_clusters": 5, "dropped": 3,
                                   "kept": 33}  # fmt: skip
    assert report["clusters"] == 2 and report["cluster_sizes"] == {"2": 1, "3": 1}
    assert report["sample_clusters"][0] == {"size": 2, "kept": f"{files[0]}:3", "dropped": [f"{files[2]}:4"]}
    assert report["sample_clusters"][1] == {
        "size": 3, "kept": f"{files[0]}:6", "dropped": [f"{files[1]}:8", f"{files[2]}:10"],
    }  # fmt: skip
    assert [i["dropped"] for i in report["inputs"]] == [0, 1, 2]


def test_a_killed_stage_resumes_without_redoing_finished_tasks(tmp_path):
    files = corpus_files(tmp_path)
    fresh = init_plan(str(tmp_path / "fresh"), files, SETTINGS)
    run_all(fresh, log=False)
    real = Path(files[2]).read_bytes()
    os.remove(files[2])
    os.mkfifo(files[2])  # reading the third input blocks until we kill the stage
    work = str(tmp_path / "w")
    assert main(["init", "--work-dir", work, "--input", *files, "--no-clean"]) == 0
    plan = load_plan(work)
    command = [sys.executable, str(ROOT / "tools" / "neardup.py"), "signatures", "--work-dir", work]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120  # hang guard only
    while not all(os.path.exists(plan.marker_path("signatures", t)) for t in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(plan.marker_path("signatures", 2))
    finished = {t: os.stat(plan.marker_path("signatures", t)).st_mtime_ns for t in (0, 1)}
    os.remove(files[2])
    Path(files[2]).write_bytes(real)
    with pytest.raises(NearDupError, match=r"signatures/00002.json: stage 'signatures' has not finished"):
        run_stage(plan, "buckets", log=False)  # out of order: a clear error, nothing written
    results = run_all(plan, log=False)
    assert (results[0].ran, results[0].skipped) == ([2], [0, 1])
    assert {t: os.stat(plan.marker_path("signatures", t)).st_mtime_ns for t in (0, 1)} == finished
    assert drop_lines(plan) == drop_lines(fresh)
    assert not list(Path(work, "signatures").glob("*.tmp"))
    again = run_all(plan, log=False)
    assert [r.ran for r in again] == [[], [], []]


def test_a_failed_task_reruns_alone(tmp_path, capsys):
    files = corpus_files(tmp_path)
    broken = tmp_path / "part1.jsonl.gz"
    broken.write_bytes(b"not gzip at all")  # task 1 fails when it reads; tasks 0 and 2 finish
    files[1] = str(broken)
    work = str(tmp_path / "w")
    assert main(["run", "--work-dir", work, "--input", *files, "--no-clean"]) == 2
    err = capsys.readouterr().err
    assert "stage 'signatures': 1 of 3 tasks failed" in err and "task 1: " in err and "part1.jsonl.gz" in err
    assert "Traceback" not in err
    write_jsonl(broken, [prose(i, 150) for i in range(5)])
    plan = load_plan(work)
    result = run_stage(plan, "signatures", log=False)
    assert (result.ran, result.skipped) == ([1], [0, 2])


def test_settings_mismatches_are_refused_with_file_and_field(tmp_path, capsys):
    files = corpus_files(tmp_path)
    plan = init_plan(str(tmp_path / "a"), files, SETTINGS)
    run_all(plan, log=False)
    with pytest.raises(
        NearDupError,
        match=r"a/plan.json: made with other settings \(bands is 16, asked for 8; rows is 7, asked for 16",
    ):
        init_plan(str(tmp_path / "a"), files, NearDupSettings(cleaning=None, bands=8, rows=16))
    other = init_plan(
        str(tmp_path / "b"), files, NearDupSettings(cleaning=None, num_perm=64, bands=8, rows=8)
    )
    shutil.rmtree(other.path("signatures", ""))
    shutil.copytree(plan.path("signatures", ""), other.path("signatures", ""))  # signatures of other settings
    mismatch = r"b/signatures/00000.json: made with other settings .*bands is 16, expected 8.*num_perm is 128"
    with pytest.raises(NearDupError, match=mismatch):
        run_stage(other, "buckets", log=False)
    assert main(["buckets", "--work-dir", other.work_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neardup.py: error:") and "Traceback" not in err
    # A shard signed by another word hashing ("tokenizer" of the shingles) is refused the same way.
    marker = Path(plan.marker_path("signatures", 1))
    data = json.loads(marker.read_text())
    data["settings"]["shingles"] = "words-v0"
    marker.write_text(json.dumps(data))
    scheme = r"a/signatures/00001.json: made with other settings than .*plan.json \(shingles is 'words-v0'"
    with pytest.raises(NearDupError, match=scheme):
        run_stage(plan, "buckets", log=False)


def test_missing_or_truncated_outputs_are_named(tmp_path):
    files = corpus_files(tmp_path)
    plan = init_plan(str(tmp_path / "w"), files, SETTINGS)
    run_stage(plan, "signatures", log=False)
    keys = plan.path("signatures", "00001.keys.npy")
    os.remove(keys)
    with pytest.raises(NearDupError, match=rf"{keys}: missing, though .*00001.json says task 1 finished"):
        run_stage(plan, "buckets", log=False)
    assert run_stage(plan, "signatures", log=False).ran == [1]  # a rerun redoes it
    run_stage(plan, "buckets", tasks=[0, 1], log=False)
    with pytest.raises(
        NearDupError, match=r"buckets/00002.json: stage 'buckets' has not finished \(14 of 16"
    ):
        run_stage(plan, "clusters", log=False)
    run_stage(plan, "buckets", log=False)
    pairs = plan.path("buckets", "00003.pairs.npy")
    with open(pairs, "r+b") as f:
        f.truncate(os.path.getsize(pairs) - 8)
    with pytest.raises(NearDupError, match=rf"{pairs}: \d+ bytes, not \d+"):
        run_stage(plan, "clusters", log=False)


def test_task_selection_for_arrays(tmp_path):
    files = corpus_files(tmp_path)
    work = str(tmp_path / "w")
    assert main(["init", "--work-dir", work, "--input", *files, "--no-clean", "--bands", "4", "--rows", "32",
                 "--bands-per-task", "3"]) == 0  # fmt: skip
    plan = load_plan(work)
    assert plan.num_tasks("buckets") == 2 and list(plan.bands_of(1)) == [3]
    assert main(["signatures", "--work-dir", work, "--task", "1", "--array-size", "2"]) == 0
    assert [os.path.exists(plan.marker_path("signatures", t)) for t in range(3)] == [False, True, False]
    assert main(["signatures", "--work-dir", work, "--task", "5"]) == 2
    assert main(["signatures", "--work-dir", work, "--task", "0", "--array-size", "2"]) == 0
    assert main(["buckets", "--work-dir", work, "--task", "7", "--array-size", "10"]) == 0  # nothing to do
    assert main(["buckets", "--work-dir", work]) == 0 and main(["cluster", "--work-dir", work]) == 0
