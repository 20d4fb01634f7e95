"""Checkpoints are untrusted input: names stay inside the checkpoint, files are regular and whole,
and the pieces of every tensor tile it exactly once, all checked before any weight is used.

Each case tampers with a real checkpoint the way an attacker (or a broken copy) would, including
a manifest rewritten to match, and goes through the command that met it: resume through
`python -m megatron_andromeda.train`, export through `tools/convert_to_hf.py`, import through
`tools/convert_from_hf.py`. Subprocess timeouts are hang guards only (a device or FIFO entry used
to block forever while being hashed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hang_guard import HANG_GUARD_S
from tiny_tokenizer import FOX, train_tiny_tokenizer, write_random_documents
from tool_loader import load_tool

from megatron_andromeda.checkpoint import (
    CheckpointError,
    load_model_weights,
    read_model_state,
    reshard_checkpoint,
)
from megatron_andromeda.config import load_config
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.models import GPTModel
from megatron_andromeda.train import run

ROOT = Path(__file__).resolve().parents[1]
STEP = "step_00000001"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tokenizer, a dataset and `base/ckpt/step_00000001` (one step of a tiny run)."""

    root = tmp_path_factory.mktemp("untrusted")
    tok = train_tiny_tokenizer(root / "tokenizer.json", [FOX] * 20, special_tokens=["<|endoftext|>"])
    write_random_documents(root / "train_text_document", 40, 1, load_tokenizer(tok).vocab_size)
    run(load_config(None, overrides(root, root / "base", "train.steps=1")))
    return root


def overrides(ws: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.tokenizer={ws / 'tokenizer.json'}", f"data.train=[{ws / 'train_text_document'}]",
        "data.seq_length=16", "model.vocab_size=384", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_length=16", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.steps=2", "train.eval_interval=0", "optim.warmup_steps=1",
        f"checkpoint.save_dir={out / 'ckpt'}", f"logging.run_dir={out / 'run'}",
        "logging.tensorboard=false", "logging.progress_bar=false", *extra,
    ]  # fmt: skip


def copy_checkpoint(ws: Path, dest: Path) -> Path:
    shutil.copytree(ws / "base" / "ckpt" / STEP, dest)
    return dest


# --------------------------------------------------------------------------------------------- tampering
def entry_for(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def rewrite_json(ckpt: Path, name: str, edit) -> None:
    """Edit a JSON file of the checkpoint and fix its manifest entry, as a careful attacker would."""
    path = ckpt / name
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    if name != "manifest.json":
        set_entry(ckpt, name, entry_for(path.read_bytes()))


def set_entry(ckpt: Path, name: str, entry: dict) -> None:
    rewrite_json(ckpt, "manifest.json", lambda m: m["files"].__setitem__(name, entry))


def rename_weights(ckpt: Path, new_name: str, entry: dict | None = None) -> None:
    """Point the manifest and every metadata piece of model.safetensors at `new_name` instead."""

    def manifest(m):
        old = m["files"].pop("model.safetensors")
        m["files"][new_name] = entry or old

    def metadata(m):
        for tensor in m["tensors"].values():
            for piece in tensor["pieces"]:
                if piece["file"] == "model.safetensors":
                    piece["file"] = new_name

    rewrite_json(ckpt, "manifest.json", manifest)
    rewrite_json(ckpt, "metadata.json", metadata)


def move_weights_outside(ckpt: Path, outside: Path, name: str) -> None:
    """model.safetensors moved to `outside`, which the checkpoint then names as `name`."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ckpt / "model.safetensors", outside)
    rename_weights(ckpt, name)


# --------------------------------------------------------------------------------------------- commands
def train(ws: Path, out: Path, load_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_andromeda.train", *overrides(ws, out),
           f"checkpoint.load_dir={load_dir}"]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


def convert_to_hf(ckpt: Path, output: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(ckpt), "--output", str(output)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


def assert_refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """A non-zero exit, one clear message holding every phrase, no traceback, nothing resumed."""
    assert result.returncode != 0, f"accepted:\n{result.stdout[-2000:]}"
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "resumed from" not in result.stdout


# --------------------------------------------------------------------------------------------- `latest`
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_resume_refuses_a_latest_outside_the_save_directory(workspace, tmp_path, absolute):
    other = copy_checkpoint(workspace, tmp_path / "other" / STEP)
    root = tmp_path / "ckpt"
    root.mkdir()
    named = str(other) if absolute else f"../other/{STEP}"
    (root / "latest").write_text(named)
    result = train(workspace, tmp_path / "run", root)
    reason = "is an absolute path" if absolute else "outside"
    assert_refused(result, "checkpoint error", str(root / "latest"), repr(named), reason)


# --------------------------------------------------------------------------------------------- weights
def test_resume_refuses_weights_named_outside_the_checkpoint(workspace, tmp_path):
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt" / STEP)
    (tmp_path / "ckpt" / "latest").write_text(STEP)
    move_weights_outside(ckpt, tmp_path / "x.safetensors", "../../x.safetensors")
    result = train(workspace, tmp_path / "run", tmp_path / "ckpt")
    assert_refused(result, "checkpoint error", "manifest.json", "'../../x.safetensors'", "outside")


def test_convert_to_hf_refuses_weights_at_an_absolute_path(workspace, tmp_path):
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere" / "x.safetensors"
    move_weights_outside(ckpt, outside, str(outside))
    result = convert_to_hf(ckpt, tmp_path / "hf")
    assert_refused(result, "convert_to_hf: error", "manifest.json", repr(str(outside)), "absolute path")
    assert not (tmp_path / "hf").exists()


def test_resume_fails_fast_on_a_manifest_entry_naming_dev_zero(workspace, tmp_path):
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt" / STEP)
    (tmp_path / "ckpt" / "latest").write_text(STEP)
    rename_weights(ckpt, "/dev/zero", entry_for(b""))  # /dev/zero reports 0 bytes, then never ends
    result = train(workspace, tmp_path / "run", tmp_path / "ckpt")
    assert_refused(result, "checkpoint error", "manifest.json", "'/dev/zero'", "absolute path")


def test_convert_to_hf_fails_fast_on_a_fifo_inside_the_checkpoint(workspace, tmp_path):
    """Inside the directory but not a regular file: opening it for reading would block forever."""
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    set_entry(ckpt, "model.safetensors", entry_for(b""))
    result = convert_to_hf(ckpt, tmp_path / "hf")
    assert_refused(result, "convert_to_hf: error", "'model.safetensors'", "not a regular file")


def test_symlinks_are_followed_only_within_the_checkpoint(workspace, tmp_path):
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt")
    _, expected = read_model_state(ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "weights.bin")
    (ckpt / "model.safetensors").symlink_to("weights.bin")  # inside: fine
    _, state = read_model_state(ckpt)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    (ckpt / "weights.bin").rename(tmp_path / "weights.bin")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(tmp_path / "weights.bin")  # out of the checkpoint: refused
    with pytest.raises(CheckpointError, match=r"'model\.safetensors' resolves to .*weights\.bin, outside"):
        read_model_state(ckpt)


# --------------------------------------------------------------------------------------------- slices
def sharded_checkpoint(ws: Path, tmp_path: Path) -> Path:
    """The base checkpoint cut for tensor 2: most tensors are two pieces, one per tensor rank."""
    return reshard_checkpoint(ws / "base" / "ckpt", tmp_path / "tp2", tensor=2, pipeline=1)


def test_convert_to_hf_refuses_a_slice_listed_twice(workspace, tmp_path):
    ckpt = sharded_checkpoint(workspace, tmp_path)

    def duplicate_first_piece(m):
        pieces = m["tensors"]["model/embedding.weight"]["pieces"]
        assert len(pieces) == 2
        pieces[1] = dict(pieces[0])  # rows 0..191 twice, rows 192..383 never

    rewrite_json(ckpt, "metadata.json", duplicate_first_piece)
    result = convert_to_hf(ckpt, tmp_path / "hf")
    assert_refused(result, "convert_to_hf: error", "metadata.json", "model/embedding.weight", "overlap")
    assert not (tmp_path / "hf").exists()


def test_a_slice_missing_is_refused_before_any_weight_is_loaded(workspace, tmp_path):
    ckpt = sharded_checkpoint(workspace, tmp_path)
    last = "model/layers.1.mlp.down_proj.weight"  # loaded after every other layer's weights

    def drop_a_piece(m):
        assert len(m["tensors"][last]["pieces"]) == 2
        m["tensors"][last]["pieces"].pop()

    rewrite_json(ckpt, "metadata.json", drop_a_piece)
    cfg, _ = read_model_state(workspace / "base" / "ckpt")
    model = GPTModel(cfg.model, init_seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = rf"metadata\.json: tensor {re.escape(last)} .*a piece is missing"
    with pytest.raises(CheckpointError, match=message):
        load_model_weights(ckpt, model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "weights half-loaded"


def test_a_piece_whose_stored_shape_differs_is_refused(workspace, tmp_path):
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt")

    def claim_fewer_rows(m):  # two pieces tiling the tensor, the first longer than what the file holds
        entry = m["tensors"]["model/embedding.weight"]
        whole = entry["pieces"][0]
        rows, cols = entry["shape"]
        entry["pieces"] = [
            {**whole, "shape": [rows // 2, cols]},
            {**whole, "key": "embedding.weight", "offsets": [rows // 2, 0], "shape": [rows // 2, cols]},
        ]

    rewrite_json(ckpt, "metadata.json", claim_fewer_rows)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'embedding\.weight' should hold"):
        read_model_state(ckpt)


# --------------------------------------------------------------------------------------------- safetensors
def test_convert_to_hf_names_a_truncated_shard(workspace, tmp_path, capsys):
    ckpt = copy_checkpoint(workspace, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()[:-100]
    (ckpt / "model.safetensors").write_bytes(data)
    set_entry(ckpt, "model.safetensors", entry_for(data))
    rc = load_tool("convert_to_hf").main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{ckpt / 'model.safetensors'} is truncated" in err, err


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_convert_from_hf_names_a_file_that_is_not_safetensors(workspace, tmp_path, capsys, damage):
    pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    assert load_tool("convert_to_hf").main(["--checkpoint", str(workspace / "base" / "ckpt"),
                                            "--output", str(hf)]) == 0  # fmt: skip
    weights = hf / "model.safetensors"
    if damage == "pickle":
        torch.save({"weight": torch.zeros(4)}, weights)
        expected = f"{weights} is not a safetensors file"
    else:
        weights.write_bytes(weights.read_bytes()[:-64])
        expected = f"{weights} is truncated"
    capsys.readouterr()
    rc = load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "back")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "back").exists()
