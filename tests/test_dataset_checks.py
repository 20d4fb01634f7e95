"""Datasets unfit for the run's tokenizer are stopped before training, evaluation and validation.

Through the documented commands (`python -m megatron_andromeda.train`, `tools/evaluate.py`,
`tools/validate_dataset.py`): a dataset whose sidecar records another tokenizer, token ids beyond
the tokenizer's vocabulary, and an empty dataset each stop with a message naming the dataset (issue
21 section 5, issue 20 item 2). The largest token id is found once and cached.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hang_guard import HANG_GUARD_S
from test_preprocess_pipeline import prose
from tiny_tokenizer import train_tiny_tokenizer
from tool_loader import load_tool

from megatron_andromeda.checkpoint import write_model_checkpoint
from megatron_andromeda.config import DataConfig, ModelConfig, RunConfig
from megatron_andromeda.data import checks
from megatron_andromeda.data.checks import token_range
from megatron_andromeda.data.gpt_dataset import GPTDataset
from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.models import GPTModel
from megatron_andromeda.preprocess.pipeline import PreprocessConfig, run

ROOT = Path(__file__).resolve().parents[1]


def preprocess(root: Path, prefix: str, tokenizer: str, documents: int, split=(0.8, 0.2, 0.0)) -> dict:
    corpus = root / f"{prefix}.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(i, words=30)}) + "\n" for i in range(documents)))
    config = PreprocessConfig(
        inputs=(str(corpus),), output_prefix=str(root / prefix), tokenizer=tokenizer, workers=0,
        split=split, append_eod=True, cleaning=None, exact_dedup=False, minhash=None,
    )  # fmt: skip
    return run(config)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tokenizers A (ours, 300 ids) and B (another, 280 ids); datasets made with each, one with ids
    beyond A's vocabulary, and one empty split with its sidecar."""
    root = tmp_path_factory.mktemp("checks")
    train_tiny_tokenizer(root / "a.json", [prose(i) for i in range(30)], vocab_size=300)
    train_tiny_tokenizer(root / "b.json", [prose(i) for i in range(40, 70)], vocab_size=280)
    preprocess(root, "ours", str(root / "a.json"), 80)
    preprocess(root, "theirs", str(root / "b.json"), 80)
    preprocess(root, "tiny", str(root / "a.json"), 3, split=(0.98, 0.01, 0.01))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / "wide_text_document", np.uint16) as writer:
        for _ in range(40):
            writer.add_document(np.append(rng.integers(2, 300, 30), 0))
        writer.add_document([5, 309, 0])  # 309: below model.vocab_size=320, beyond the tokenizer
    return root


def sha(path: Path) -> str:
    return load_tokenizer(path).sha256


def train(ws: Path, run_dir: Path, dataset: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "megatron_andromeda.train", f"data.tokenizer={ws / 'a.json'}",
        f"data.train=[{ws / dataset}]", "data.seq_length=16", "model.vocab_size=320",
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.max_seq_length=16",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=2", "train.eval_interval=0",
        "train.eval_batches=0", "optim.warmup_steps=1", "logging.log_interval=1",
        f"logging.run_dir={run_dir}", "logging.tensorboard=false", "logging.progress_bar=false", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


# ------------------------------------------------------------------------------------------- training
def test_training_stops_on_another_tokenizers_dataset_unless_allowed(ws, tmp_path):
    result = train(ws, tmp_path / "run", "theirs_train_text_document")
    assert result.returncode != 0 and "step" not in result.stdout
    message = result.stderr
    assert sha(ws / "a.json") in message and sha(ws / "b.json") in message  # both tokenizers named
    assert "theirs_train_text_document" in message and "theirs.json" in message
    assert "data.allow_tokenizer_mismatch=true" in message and "Traceback" not in message

    allowed = train(ws, tmp_path / "run2", "theirs_train_text_document", "data.allow_tokenizer_mismatch=true")
    assert allowed.returncode == 0, allowed.stderr
    assert "step      2/2" in allowed.stdout and "warning:" in allowed.stderr


def test_token_ids_beyond_the_tokenizer_stop_training_before_it_starts(ws, tmp_path):
    result = train(ws, tmp_path / "run", "wide_text_document")
    assert result.returncode != 0 and "step" not in result.stdout  # not ten inf-loss steps first
    assert f"{ws / 'wide_text_document'}.bin holds token id 309" in result.stderr
    assert "has only 300 ids" in result.stderr


def test_empty_dataset_is_named_with_its_sidecar(ws, tmp_path):
    report = json.loads((ws / "tiny.json").read_text())
    empty = next(o["prefix"] for o in report["outputs"].values() if o["documents"] == 0)
    result = train(ws, tmp_path / "run", os.path.basename(empty))
    assert result.returncode != 0
    assert f"dataset {empty} " in result.stderr and f"sidecar {ws / 'tiny.json'}" in result.stderr
    assert "cannot cut samples" not in result.stderr


def test_gpt_dataset_names_a_dataset_without_tokens(ws):
    report = json.loads((ws / "tiny.json").read_text())
    empty = next(o["prefix"] for o in report["outputs"].values() if o["documents"] == 0)
    with pytest.raises(DatasetError, match=f"dataset {empty} has no tokens.*sidecar {ws / 'tiny.json'}"):
        GPTDataset(IndexedDataset(empty), np.zeros(0, np.int32), 4, 16, 0, eod_id=0)


# ------------------------------------------------------------------------------------- the token range
def test_largest_token_id_comes_from_the_sidecar_then_a_cached_scan(ws, tmp_path, monkeypatch):
    ours = IndexedDataset(ws / "ours_train_text_document")
    sidecar = checks.find_sidecar(ours.prefix)
    assert token_range(ours, str(tmp_path / "c1"), sidecar).source == "sidecar"
    assert token_range(ours, str(tmp_path / "c1"), sidecar).max_id == int(ours.tokens.max())

    prefix = tmp_path / "wide_text_document"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents([np.arange(200) % 300, [5, 309, 0]])
    wide = IndexedDataset(prefix)
    scans = []
    real_scan = checks.scan_token_range
    monkeypatch.setattr(checks, "scan_token_range", lambda d: scans.append(d.prefix) or real_scan(d, 64))
    first = token_range(wide, str(tmp_path / "c2"))
    again = token_range(wide, str(tmp_path / "c2"))
    assert (first.source, again.source, len(scans)) == ("scan", "cache", 1)  # a restart does not rescan
    assert first.max_id == again.max_id == 309 and first.min_id == 0

    with IndexedDatasetWriter(prefix, np.uint16) as writer:  # rewritten: the cached range is stale
        writer.add_document([1, 2, 3])
    rewritten = token_range(IndexedDataset(prefix), str(tmp_path / "c2"))
    assert (rewritten.source, rewritten.max_id) == ("scan", 3)


def test_a_sidecar_that_does_not_describe_the_files_is_not_trusted(ws, tmp_path):
    prefix = tmp_path / "copy_train_text_document"
    source = ws / "ours_train_text_document"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(Path(f"{source}{suffix}").read_bytes())
    sidecar = json.loads((ws / "ours.json").read_text())
    sidecar["outputs"]["train/text"].update(prefix=str(prefix), max_token_id=1, tokens=7)
    (tmp_path / "copy.json").write_text(json.dumps(sidecar, indent=2))
    dataset = IndexedDataset(prefix)
    found = token_range(dataset, str(tmp_path / "cache"), checks.find_sidecar(prefix))
    assert found.source == "scan" and found.max_id == int(dataset.tokens.max())


# ------------------------------------------------------------------------------------------- evaluation
def test_evaluation_stops_on_another_tokenizers_dataset_unless_allowed(ws, tmp_path, capsys):
    model_cfg = ModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, max_seq_length=16)
    cfg = RunConfig(model=model_cfg, data=DataConfig(tokenizer=str(ws / "a.json"), seq_length=16)).validate()
    torch.manual_seed(0)
    write_model_checkpoint(tmp_path / "ckpt", cfg, GPTModel(model_cfg).state_dict())
    cmd = [sys.executable, "tools/evaluate.py", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu",
           "--valid-data", str(ws / "theirs_valid_text_document")]  # fmt: skip
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert refused.returncode == 2 and "| dataset" not in refused.stdout
    assert sha(ws / "a.json") in refused.stderr and sha(ws / "b.json") in refused.stderr
    assert "--allow-tokenizer-mismatch" in refused.stderr
    assert load_tool("evaluate").main([*cmd[2:], "--allow-tokenizer-mismatch"]) == 0  # in process: faster
    out, err = capsys.readouterr()
    assert "| theirs_valid_text_document | theirs | valid |" in out and "warning:" in err


# ------------------------------------------------------------------------------------------- validation
def validate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/validate_dataset.py", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_validate_accepts_file_paths_and_warns_on_an_empty_dataset(ws):
    report = json.loads((ws / "tiny.json").read_text())
    empty = next(o["prefix"] for o in report["outputs"].values() if o["documents"] == 0)
    files = (ws / "ours_train_text_document.bin", ws / "ours_valid_text_document.idx", f"{empty}.bin")
    result = validate(*files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok   ") == 3 and f"sidecar {ws / 'ours.json'}" in result.stdout
    assert f"warning: {empty} is empty (0 documents, 0 tokens)" in result.stderr
    assert "ours_train_text_document is empty" not in result.stderr


def test_validate_compares_the_tokenizer_with_the_sidecar(ws):
    refused = validate(ws / "theirs_train_text_document", "--tokenizer", ws / "a.json")
    assert refused.returncode == 1
    assert sha(ws / "a.json") in refused.stderr and sha(ws / "b.json") in refused.stderr
    assert validate(ws / "ours_train_text_document", "--tokenizer", ws / "a.json").returncode == 0
    theirs, ours = ws / "theirs_train_text_document", ws / "a.json"
    allowed = validate(theirs, "--tokenizer", ours, "--allow-tokenizer-mismatch")
    assert allowed.returncode == 0 and "warning:" in allowed.stderr
