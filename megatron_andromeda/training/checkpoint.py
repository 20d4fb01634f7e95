"""The checkpoint API under its original import path; the implementation is `megatron_andromeda.checkpoint`.

`flatten_optimizer_state` / `unflatten_optimizer_state` remain for code that stores a plain torch
optimizer's state by hand: tensors for safetensors and JSON for the rest, never a pickle.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_andromeda.checkpoint import (
    LATEST,
    MANIFEST,
    Checkpointer,
    CheckpointError,
    Placement,
    load_checkpoint,
    load_model_weights,
    read_model_state,
    reshard_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
    verify_checkpoint,
    write_model_checkpoint,
)

__all__ = [
    "LATEST",
    "MANIFEST",
    "CheckpointError",
    "Checkpointer",
    "Placement",
    "flatten_optimizer_state",
    "load_checkpoint",
    "load_model_weights",
    "read_model_state",
    "reshard_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_dir_name",
    "unflatten_optimizer_state",
    "verify_checkpoint",
    "write_model_checkpoint",
]


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
