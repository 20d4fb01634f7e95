"""Checkpoints: atomic, verifiable, pickle-free.

Layout of a save root:

    ROOT/latest                 name of the newest complete checkpoint ("step_00000100")
    ROOT/step_00000100/
        config.json             the resolved RunConfig
        trainer_state.json      step, consumed samples, skipped steps, data / RNG state (JSON parts)
        model.safetensors       model weights, named as in GPTModel.state_dict()
        optimizer.safetensors   optimizer tensors, keyed "state.<param index>.<name>"
        optimizer.json          optimizer param groups (hyper-parameters)
        rng.safetensors         torch RNG states
        manifest.json           size and sha256 of every file above; written last

A checkpoint is written under a temporary name, fsynced, renamed into place, and only then is
`latest` replaced. On load every file is checked against the manifest; a `latest` that names a
missing or incomplete checkpoint falls back to the newest complete one with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from megatron_andromeda.config import RunConfig, config_from_dict

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


# ------------------------------------------------------------------------------------------- writing
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    config: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_json(tmp / "config.json", config.to_dict())
    _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "rng": python_rng_state()})
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
    if optimizer is not None:
        tensors, groups = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", groups)
    save_file(torch_rng_state(), str(tmp / "rng.safetensors"))
    _write_manifest(tmp)
    if final.exists():  # a re-save of the same step replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name)
    _prune(root, keep_last)
    return final


def write_model_checkpoint(path: str | Path, config: RunConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """A weights-only checkpoint (e.g. converted from Hugging Face) that `train.init_from` can start from."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_json(tmp / "config.json", config.to_dict())
    save_file(_contiguous(state_dict), str(tmp / "model.safetensors"))
    _write_manifest(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------- reading
def resolve_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory from a directory or a save root (through `latest`, with fallback)."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / "model.safetensors").exists():
        return path
    if not path.is_dir():
        return None
    candidates = sorted((p for p in path.iterdir() if _STEP_DIR.match(p.name)), reverse=True)
    latest = path / LATEST
    if latest.exists():
        named = path / latest.read_text().strip()
        if _is_complete(named):
            return named
        warnings.warn(
            f"{latest} names {named.name}, which is missing or incomplete; "
            "falling back to the newest complete checkpoint",
            stacklevel=2,
        )
    for candidate in candidates:
        if _is_complete(candidate):
            return candidate
    return None


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file against the manifest; raises CheckpointError naming the bad file."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint is incomplete")
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["files"].items():
        file = ckpt / name
        if not file.exists():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint file {file} has {size} bytes, the manifest says {entry['size']}"
            )
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {file} fails its sha256 check (corrupted)")


def read_model_state(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The resolved config and the full model state dict of a checkpoint (directory or save root)."""
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    verify_checkpoint(ckpt)
    config = config_from_dict(json.loads((ckpt / "config.json").read_text()))
    return config, load_file(str(ckpt / "model.safetensors"))


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load model (and optimizer, RNG) state in place; returns the trainer state."""
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    verify_checkpoint(ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    trainer_state: dict[str, Any] = {}
    if (ckpt / "trainer_state.json").exists():
        trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    if optimizer is not None and (ckpt / "optimizer.safetensors").exists():
        groups = json.loads((ckpt / "optimizer.json").read_text())
        optimizer.load_state_dict(
            unflatten_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), groups)
        )
    if restore_rng and (ckpt / "rng.safetensors").exists():
        set_torch_rng_state(load_file(str(ckpt / "rng.safetensors")))
        if "rng" in trainer_state:
            set_python_rng_state(trainer_state["rng"])
    trainer_state["path"] = str(ckpt)
    return trainer_state


# ------------------------------------------------------------------------------------------- state codecs
def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (flat tensors for safetensors, JSON-able param groups)."""
    tensors = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in groups.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups["param_groups"]}


def torch_rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_torch_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def python_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_python_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


# ------------------------------------------------------------------------------------------- helpers
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {}
    for file in sorted(directory.iterdir()):
        if file.name == MANIFEST:
            continue
        _fsync_file(file)
        files[file.name] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    _write_json(directory / MANIFEST, {"format": "andromeda-checkpoint-v1", "files": files})
    _fsync_file(directory / MANIFEST)
    _fsync_dir(directory)


def _is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and (ckpt / MANIFEST).exists()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and _is_complete(p))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
