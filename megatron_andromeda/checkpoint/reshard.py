"""Writing a checkpoint at a chosen tensor x pipeline layout, offline on CPU, from any tensor source.

Two users: `tools/reshard_checkpoint.py` (a checkpoint of any layout -> another layout) and
`write_model_checkpoint` (a full state dict, e.g. imported from Hugging Face -> any layout).
Each (pipeline, tensor) position is written as its data-rank-0 rank would write it: the stage's
parameters, its shard of each, replicated ranges once, in `model-rankNNNNN.safetensors`.

Any layout can load any checkpoint, so this changes where the pieces live, not what loads:
afterwards each rank of the target layout reads its own file instead of slicing everyone's.
Optimizer state is written as whole tensor shards (the loader cuts the ZeRO-1 fragments of any
data-parallel degree from them). Random states belong to the ranks of the saving layout and are
not carried over; a run resumed from the output starts its random streams from the seed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_andromeda.checkpoint.loader import open_checkpoint
from megatron_andromeda.checkpoint.saver import RankPayload, commit, write_payload
from megatron_andromeda.checkpoint.slices import ShardSpec, global_pieces, owned_ranges, shard_spec
from megatron_andromeda.checkpoint.state import Piece, Placement
from megatron_andromeda.checkpoint.storage import (
    CheckpointError,
    prepare_tmp_dir,
    step_dir_name,
    wait_for_markers,
)
from megatron_andromeda.config import ConfigError, RunConfig
from megatron_andromeda.parallel.layout import RankLayout, check_tensor_parallel, split_layers

ReadFn = Callable[[str, ShardSpec], torch.Tensor]  # (tensor id, spec) -> that part of the global tensor
_LAYER = re.compile(r"^layers\.(\d+)\.")


def relayout_config(cfg: RunConfig, tensor: int, pipeline: int) -> RunConfig:
    """`cfg` with the new degrees (data derived from the world size); raises ConfigError if impossible."""
    if tensor < 1 or pipeline < 1:
        raise ConfigError(f"tensor={tensor} and pipeline={pipeline} must be >= 1")
    check_tensor_parallel(cfg.model, tensor)
    if pipeline > cfg.model.num_layers:
        raise ConfigError(f"pipeline={pipeline} exceeds model.num_layers={cfg.model.num_layers}")
    same_stages = pipeline == cfg.parallel.pipeline
    parallel = dataclasses.replace(
        cfg.parallel, tensor=tensor, pipeline=pipeline, data=None,
        sequence_parallel=cfg.parallel.sequence_parallel and tensor > 1,
        layers_per_stage=cfg.parallel.layers_per_stage if same_stages else None,
        virtual_stages=cfg.parallel.virtual_stages if same_stages else 1,
    )  # fmt: skip
    return dataclasses.replace(cfg, parallel=parallel)


def stage_of(name: str, spans: list[range]) -> int:
    """The pipeline stage (no interleaving) that holds parameter `name`."""
    match = _LAYER.match(name)
    if match:
        layer = int(match.group(1))
        return next(stage for stage, span in enumerate(spans) if layer in span)
    return 0 if name.startswith("embedding.") else len(spans) - 1


def write_layout(
    final: Path,
    cfg: RunConfig,
    shapes: Mapping[str, tuple[int, ...]],
    read: ReadFn,
    json_files: dict[str, Any],
    optimizer: dict[str, Any] | None = None,
    publish: bool = False,
) -> Path:
    """Write the tensors `shapes` ("model/<name>", "optimizer/<name>/<state>") at cfg's tensor x pipeline.

    With `publish`, final's parent is a save root whose `latest` then names it.
    """
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    layout = RankLayout(tp=tp, pp=pp, dp=1)
    spans = split_layers(cfg.model.num_layers, pp)
    tmp = prepare_tmp_dir(final)
    for pp_rank in range(pp):
        ids = [t for t in shapes if stage_of(t.split("/")[1], spans) == pp_rank]
        for tp_rank in range(tp):
            placement = Placement(layout, layout.rank_of(pp_rank, 0, tp_rank))
            first = placement.rank == 0
            payload = RankPayload(placement.rank, json_files=json_files if first else {})
            for kind in ("model", "optimizer"):
                pieces = (
                    p
                    for t in ids
                    if t.startswith(kind + "/")
                    for p in _pieces(t, shapes[t], read, cfg, tp_rank)
                )
                payload.add(placement.file_name(kind), pieces, copy=False)
            payload.optimizer = optimizer if first else None
            write_payload(tmp, payload)
    reports = wait_for_markers(tmp, layout.world_size, timeout_s=0)
    commit(tmp, final, reports, Placement(layout).describe(), publish=publish)
    return final


def _pieces(tensor_id: str, shape: tuple[int, ...], read: ReadFn, cfg: RunConfig, tp_rank: int):
    name, tp = tensor_id.split("/")[1], cfg.parallel.tensor
    spec = shard_spec(name, shape, cfg.model, tp_rank, tp)
    owned = owned_ranges(name, shape, cfg.model, tp_rank, tp)
    local = read(tensor_id, spec)
    for box, data in global_pieces(local.reshape(-1), 0, spec, shape, owned):
        yield Piece(tensor_id, shape, box, data)


def cut(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The part `spec` of a full tensor."""
    return torch.cat([full.narrow(spec.dim, a, b - a) for a, b in spec.ranges], dim=spec.dim)


# --------------------------------------------------------------------------------------------- entry points
def write_model_checkpoint(
    path: str | Path, config: RunConfig, state_dict: Mapping[str, torch.Tensor], *, tensor: int = 1,
    pipeline: int = 1,
) -> Path:  # fmt: skip
    """A weights-only checkpoint directory (e.g. converted from Hugging Face), cut for tensor x pipeline.

    `train.init_from` and every reader accept it whatever the layout it was cut for.
    """
    cfg = relayout_config(config, tensor, pipeline)
    full = {f"model/{n}": t.detach().cpu() for n, t in state_dict.items()}
    shapes = {t: tuple(v.shape) for t, v in full.items()}
    return write_layout(
        Path(path), cfg, shapes, lambda t, spec: cut(full[t], spec), {"config.json": cfg.to_dict()}
    )


def reshard_checkpoint(
    source: str | Path, output: str | Path, tensor: int, pipeline: int, *, with_optimizer: bool = True
) -> Path:
    """Rewrite the checkpoint at `source` for tensor x pipeline under the save root `output`."""
    reader = open_checkpoint(source)
    cfg = relayout_config(reader.config, tensor, pipeline)
    shapes = {
        t: reader.shape(t)
        for t in reader.metadata["tensors"]
        if t.startswith("model/") or (with_optimizer and t.startswith("optimizer/"))
    }
    step = int(reader.trainer_state.get("step", 0))
    json_files: dict[str, Any] = {"config.json": cfg.to_dict()}
    if reader.trainer_state:
        json_files["trainer_state.json"] = reader.trainer_state
    optimizer = reader.metadata.get("optimizer") if with_optimizer else None
    output = Path(output)
    if output.resolve() == reader.path.parent.resolve():
        raise CheckpointError(f"--output {output} is the source's own save root; choose another directory")
    return write_layout(
        output / step_dir_name(step), cfg, shapes, reader.assemble, json_files, optimizer, publish=True
    )
