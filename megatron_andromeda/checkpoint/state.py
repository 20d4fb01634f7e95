"""What one rank contributes to a checkpoint: its place in the layout, its tensor pieces, its RNG.

Parameter names are global (a pipeline stage's names are a subset of the full model's). Two local
names map to another global name: an interleaved rank's chunk prefix ("1.layers.5...") is dropped,
and the last stage's copy of a tied embedding (`lm_head.weight`) *is* `embedding.weight`, written
by the first stage only.

Who writes what (every value exactly once):
- model weights: data rank 0, and of tensor-replicated ranges the lowest tensor rank (slices.py);
  under full sharding (FSDP2) every data rank of the first replica its rows of them, a fragment
  like ZeRO-1's (its DTensor `Shard(0)` is rows [r0, r1) of the tensor-parallel shard);
- optimizer state: likewise with a replicated optimizer; with the distributed optimizer (ZeRO-1)
  or full sharding every data rank (of the first replica) writes its own fragments;
- RNG states: every rank, its own (they differ per rank).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.checkpoint.slices import Box, ShardSpec, global_pieces, owned_ranges, shard_spec
from megatron_andromeda.checkpoint.storage import CheckpointError
from megatron_andromeda.config import ModelConfig, RunConfig
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.fully_sharded import local_shard
from megatron_andromeda.parallel.layout import RankLayout, RunLayout, validate_layout

_CHUNK_PREFIX = re.compile(r"^\d+\.")
ADAM_TENSORS = ("exp_avg", "exp_avg_sq", "master_param")


@dataclass(frozen=True)
class Placement:
    """This rank's coordinates in the tensor x pipeline x data layout, and what its data group shards.

    `sharded_optimizer`: every data rank holds (and writes) its own optimizer fragments (ZeRO-1 and
    full sharding); `sharded_model`: its own fragments of the weights too (full sharding), of which
    only the first of `data_replicas` replicas writes (HSDP: the others hold copies).
    """

    layout: RankLayout = RankLayout(1, 1, 1)
    rank: int = 0
    sharded_optimizer: bool = False
    sharded_model: bool = False
    data_replicas: int = 1

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Placement:
        """From the run config and torch.distributed's rank and world size (one process: single)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        layout = validate_layout(cfg.parallel, cfg.model, world)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls.for_sharding(layout, rank, cfg.parallel.sharding, cfg.parallel.data_replicas)

    @classmethod
    def from_context(cls, ctx: ParallelContext, sharded_optimizer: bool | None = None) -> Placement:
        """ctx's place with its run layout's data sharding; a bare RankLayout shards the optimizer
        (ZeRO-1) if `sharded_optimizer`. Contradicting the run layout is an error."""
        if not isinstance(ctx.layout, RunLayout):
            return cls(ctx.layout, ctx.rank, bool(sharded_optimizer) and ctx.dp_size > 1)
        placement = cls.of_run(ctx.layout, ctx.rank)
        if sharded_optimizer is not None and sharded_optimizer != placement.sharded_optimizer:
            raise ValueError(
                f"sharded_optimizer={sharded_optimizer} but the run layout's data sharding is "
                f"{ctx.layout.data_sharding}: leave it unset"
            )
        return placement

    @classmethod
    def of_run(cls, layout: RunLayout, rank: int) -> Placement:
        return cls.for_sharding(layout, rank, layout.data_sharding, layout.data_replicas)

    @classmethod
    def for_sharding(cls, layout: RankLayout, rank: int, mode: str, replicas: int = 1) -> Placement:
        """`mode`: parallel.data_sharding (none, optimizer, full); nothing is sharded over one data rank."""
        mode = mode if layout.dp > 1 else "none"
        full = mode == "full"
        return cls(layout, rank, mode != "none", full, replicas if full else 1)

    @property
    def world(self) -> int:
        return self.layout.world_size

    @property
    def coords(self) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank)."""
        return self.layout.coords(self.rank)

    @property
    def first_replica(self) -> bool:
        """In the first data replica: always without HSDP."""
        return self.coords[1] < self.layout.dp // self.data_replicas

    @property
    def writes_model(self) -> bool:
        """Data rank 0 writes the weights; under full sharding every rank its shard (first replica)."""
        return self.first_replica and (self.sharded_model or self.coords[1] == 0)

    @property
    def writes_optimizer(self) -> bool:
        return self.first_replica and (self.sharded_optimizer or self.coords[1] == 0)

    def describe(self) -> dict[str, Any]:
        lay = self.layout
        out = {"tensor": lay.tp, "pipeline": lay.pp, "data": lay.dp, "world_size": lay.world_size,
               "sharded_optimizer": self.sharded_optimizer}  # fmt: skip
        if self.sharded_model:  # (absent otherwise: the layouts of earlier checkpoints stay comparable)
            out.update(data_sharding="full", data_replicas=self.data_replicas)
        return out

    def file_name(self, kind: str, ext: str = "safetensors") -> str:
        """`model.safetensors` for one process, `model-rank00003.safetensors` for rank 3 of several."""
        return f"{kind}.{ext}" if self.world == 1 else f"{kind}-rank{self.rank:05d}.{ext}"


# --------------------------------------------------------------------------------------------- names
def model_config_of(model: nn.Module) -> ModelConfig:
    for module in model.modules():
        if isinstance(module, GPTModel):
            return module.cfg
    raise CheckpointError(f"{type(model).__name__} holds no GPTModel: cannot map its parameters")


def global_name(local: str, cfg: ModelConfig) -> str:
    name = _CHUNK_PREFIX.sub("", local, count=1)
    return "embedding.weight" if name == "lm_head.weight" and cfg.tie_embeddings else name


def is_tied_copy(local: str, cfg: ModelConfig) -> bool:
    return cfg.tie_embeddings and _CHUNK_PREFIX.sub("", local, count=1) == "lm_head.weight"


def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in GPTModel(cfg).named_parameters()}


# --------------------------------------------------------------------------------------------- pieces
@dataclass
class Piece:
    """One box of a global tensor `tensor_id` ("model/<name>" or "optimizer/<name>/<state>")."""

    tensor_id: str
    global_shape: tuple[int, ...]
    box: Box
    data: torch.Tensor


def _spec(name: str, shape: tuple[int, ...], cfg: ModelConfig, placement: Placement) -> ShardSpec:
    tp_rank, tp = placement.coords[2], placement.layout.tp
    return shard_spec(name, shape, cfg, tp_rank, tp)


def model_pieces(model: nn.Module, placement: Placement) -> Iterator[Piece]:
    """The pieces of the model's weights this rank owns (see the module docstring)."""
    if not placement.writes_model:
        return
    cfg = model_config_of(model)
    shapes = global_shapes(cfg)
    tp_rank, tp = placement.coords[2], placement.layout.tp
    for local, param in model.named_parameters():
        if is_tied_copy(local, cfg):
            continue
        name = global_name(local, cfg)
        spec, owned = (
            _spec(name, shapes[name], cfg, placement),
            owned_ranges(name, shapes[name], cfg, tp_rank, tp),
        )
        _check_shape(name, param.shape, spec.local_shape(shapes[name]))
        flat, start = local_shard(param)  # all of it, or its FSDP2 rows [r0, r1) at r0 * row
        for box, data in global_pieces(flat, start, spec, shapes[name], owned):
            yield Piece(f"model/{name}", shapes[name], box, data)


@dataclass
class Fragment:
    """Optimizer state of elements [start, stop) of one flattened (local) parameter."""

    local_name: str
    start: int
    stop: int
    numel: int
    tensors: dict[str, torch.Tensor]  # 1-D, stop - start elements each
    step: float | None


def optimizer_fragments(optimizer: Any, model: nn.Module) -> tuple[list[Fragment], list[dict[str, Any]]]:
    """This rank's Adam state as fragments, and the param groups (hyper-parameters and names).

    A torch optimizer holds whole parameters; the parallel optimizers (parallel/mixed_precision.py)
    return fragments with shard_start / shard_stop and name their parameters in param_groups.
    """
    state = optimizer.state_dict()
    if isinstance(optimizer, torch.optim.Optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    else:
        ordered = [n for group in state["param_groups"] for n in group["param_names"]]
        group_names = [group["param_names"] for group in state["param_groups"]]
    fragments = []
    for index, entry in state["state"].items():
        name = ordered[int(index)]
        tensors = {k: v.detach().reshape(-1) for k, v in entry.items() if k in ADAM_TENSORS}
        unknown = set(entry) - {*ADAM_TENSORS, "step", "shard_start", "shard_stop", "numel"}
        if unknown:
            raise CheckpointError(
                f"optimizer state of {name} has entries {sorted(unknown)} this format lacks"
            )
        numel = entry.get("numel") or next(iter(tensors.values())).numel()
        start, stop = entry.get("shard_start", 0), entry.get("shard_stop", numel)
        step = float(entry["step"]) if "step" in entry else None
        fragments.append(Fragment(name, start, stop, numel, tensors, step))
    groups = [
        {**{k: v for k, v in group.items() if k not in ("params", "param_names")}, "params": list(names_)}
        for group, names_ in zip(state["param_groups"], group_names)
    ]
    return fragments, groups


def optimizer_pieces(fragments: list[Fragment], model: nn.Module, placement: Placement) -> Iterator[Piece]:
    """The pieces of the optimizer state this rank owns."""
    if not placement.writes_optimizer:
        return
    cfg = model_config_of(model)
    shapes = global_shapes(cfg)
    tp_rank, tp = placement.coords[2], placement.layout.tp
    for f in fragments:
        if is_tied_copy(f.local_name, cfg):
            continue
        name = global_name(f.local_name, cfg)
        spec, owned = (
            _spec(name, shapes[name], cfg, placement),
            owned_ranges(name, shapes[name], cfg, tp_rank, tp),
        )
        for key, flat in f.tensors.items():
            for box, data in global_pieces(flat, f.start, spec, shapes[name], owned):
                yield Piece(f"optimizer/{name}/{key}", shapes[name], box, data)


def optimizer_steps(fragments: list[Fragment], model: nn.Module) -> dict[str, float]:
    cfg = model_config_of(model)
    return {global_name(f.local_name, cfg): f.step for f in fragments if f.step is not None}


def _check_shape(name: str, actual: torch.Size, expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        raise CheckpointError(
            f"parameter {name} has shape {tuple(actual)} on this rank, expected {expected} for its "
            "tensor-parallel shard: is the placement (tensor degree / rank) right?"
        )


# --------------------------------------------------------------------------------------------- RNG
def rng_state(tracker: Any = None) -> dict[str, Any]:
    """Every random state of this process as JSON: python, numpy, torch CPU / CUDA, tracker streams."""
    np_state = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if tracker is not None:
        state["tracker"] = [[name, device, s.tolist()] for (name, device), s in tracker.get_states().items()]
    return state


def restore_rng(state: dict[str, Any], tracker: Any = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])
    if tracker is not None and "tracker" in state:
        tracker.set_states({(n, d): torch.tensor(s, dtype=torch.uint8) for n, d, s in state["tracker"]})
