"""Loading a checkpoint saved at any layout into a model (and optimizer) at any other layout.

Each rank reads only the boxes it needs: for every local parameter it computes its shard spec
(slices.py) and copies the overlapping parts of the stored pieces, through safetensors' lazy
slices. Optimizer state is rebuilt the same way, as the whole local shard, and then cut to the
fragment this rank's optimizer holds (ZeRO-1) or loaded whole. Files are checked against the
manifest (size and sha256) the first time they are opened, so a rank hashes only what it reads.
Nothing is unpickled: tensors come from safetensors, everything else from JSON.

A checkpoint is untrusted input: on opening, metadata.json's pieces must come from files the
manifest lists and tile every tensor exactly once (slices.check_tiling); before a rank copies any
weight, the files it reads are verified and their safetensors headers must hold each piece with
the shape and dtype the metadata gives. File names go through storage.resolve_inside.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn

from megatron_andromeda.checkpoint.saver import tokenizer_sha256
from megatron_andromeda.checkpoint.slices import (
    Box,
    ShardSpec,
    StoredPiece,
    assemble,
    check_tiling,
    shard_spec,
    whole,
)
from megatron_andromeda.checkpoint.state import (
    ADAM_TENSORS,
    Placement,
    global_name,
    global_shapes,
    model_config_of,
    restore_rng,
)
from megatron_andromeda.checkpoint.storage import (
    MANIFEST,
    METADATA,
    SAFETENSORS_DTYPES,
    CheckpointError,
    check_file,
    in_parallel,
    read_manifest,
    read_safetensors_header,
    resolve_checkpoint,
)
from megatron_andromeda.config import ModelConfig, RunConfig, config_from_dict
from megatron_andromeda.parallel.fully_sharded import local_shard

# Optimizer hyper-parameters restored from a checkpoint; implementation flags (foreach, fused...)
# stay those of the optimizer being loaded into.
HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in SAFETENSORS_DTYPES.items()}
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "kv_channels",
                "ffn_size", "block", "norm", "activation", "position_embedding",
                "tie_embeddings")  # fmt: skip


class CheckpointReader:
    """One checkpoint directory: its verified JSON files, its tensor index, and lazy tensor reads."""

    def __init__(self, ckpt: str | Path):
        self.path = Path(ckpt)
        self.manifest = read_manifest(self.path)
        self._verified: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._pieces_in: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # file -> (tensor id, piece)
        self.config: RunConfig = config_from_dict(self.read_json("config.json"))
        if METADATA not in self.manifest:
            raise CheckpointError(
                f"{self.path} has no {METADATA} (its manifest lists none): it is not a checkpoint of this "
                "format, or was written before distributed checkpoints existed; save it again"
            )
        self.metadata = self.read_json(METADATA)
        check_tensor_index(self.metadata, self.manifest, self.path / METADATA)
        for tensor_id, entry in self.metadata["tensors"].items():
            for piece in entry["pieces"]:
                self._pieces_in.setdefault(piece["file"], []).append((tensor_id, piece))
        has_state = "trainer_state.json" in self.manifest
        self.trainer_state: dict[str, Any] = self.read_json("trainer_state.json") if has_state else {}

    # ------------------------------------------------------------------------------------------ files
    def verify(self, name: str) -> Path:
        if name not in self._verified:
            if name not in self.manifest:
                raise CheckpointError(f"{self.path / name} is not listed in {self.path / 'manifest.json'}")
            check_file(self.path, name, self.manifest[name])
            self._verified.add(name)
        return self.path / name

    def prefetch(self, requests: Iterable[tuple[str, ShardSpec]]) -> None:
        """Verify, several files at a time, every file holding part of the requested (tensor, spec)."""
        files = set()
        for tensor_id, spec in requests:
            entry = self.metadata["tensors"][tensor_id]
            wants = [spec.range_box(i, entry["shape"]) for i in range(len(spec.ranges))]
            for piece in entry["pieces"]:
                box = Box.from_json(piece)
                if any(want.intersect(box) for want in wants):
                    files.add(piece["file"])
        in_parallel(self.verify, sorted(files - self._verified))
        for name in sorted(files):  # their headers, before any weight is used
            self._handle(name)

    def read_json(self, name: str) -> Any:
        return json.loads(self.verify(name).read_text())

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            path = self.verify(name)
            self._check_header(name, read_safetensors_header(path))
            try:
                self._handles[name] = safe_open(path, framework="pt", device="cpu")
            except SafetensorError as e:
                raise CheckpointError(f"{self.path / name} is not a readable safetensors file ({e})") from e
        return self._handles[name]

    def _check_header(self, name: str, header: Mapping[str, Any]) -> None:
        """Every piece metadata.json places in file `name` is there, with its shape and dtype."""
        for tensor_id, piece in self._pieces_in.get(name, ()):
            found = header.get(piece["key"])
            dtype = self.metadata["tensors"][tensor_id]["dtype"]
            if (
                not isinstance(found, dict)
                or found.get("shape") != piece["shape"]
                or (_DTYPE_NAMES.get(found.get("dtype")) != dtype)
            ):
                held = f"{found.get('dtype')} {found.get('shape')}" if isinstance(found, dict) else "nothing"
                raise CheckpointError(
                    f"{self.path / name}: key {piece['key']!r} should hold a {dtype} piece of shape "
                    f"{piece['shape']} of {tensor_id} ({METADATA}), the file has {held}"
                )

    # ------------------------------------------------------------------------------------------ tensors
    def has(self, tensor_id: str) -> bool:
        return tensor_id in self.metadata["tensors"]

    def shape(self, tensor_id: str) -> tuple[int, ...]:
        return tuple(self.metadata["tensors"][tensor_id]["shape"])

    def tensor_ids(self, prefix: str) -> list[str]:
        return [t for t in self.metadata["tensors"] if t.startswith(prefix)]

    def assemble(self, tensor_id: str, spec: ShardSpec) -> torch.Tensor:
        """The part `spec` of global tensor `tensor_id` (in its stored dtype)."""
        entry = self.metadata["tensors"][tensor_id]
        pieces = [StoredPiece(p["file"], p["key"], Box.from_json(p)) for p in entry["pieces"]]
        return assemble(tensor_id, spec, entry["shape"], pieces, self._read, getattr(torch, entry["dtype"]))

    def _read(self, piece: StoredPiece, box: Box) -> torch.Tensor:
        return self._handle(piece.file).get_slice(piece.key)[box.slices(piece.box.offsets)]


# --------------------------------------------------------------------------------------------- entry points
def open_checkpoint(path: str | Path) -> CheckpointReader:
    """A reader for the checkpoint at `path` (a checkpoint directory or a save root)."""
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return CheckpointReader(ckpt)


def read_model_state(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The resolved config and the FULL model state dict of a checkpoint, whatever layout wrote it."""
    reader = open_checkpoint(path)
    order = list(global_shapes(reader.config.model)) if METADATA in reader.manifest else []
    reader.prefetch((t, whole(reader.shape(t))) for t in reader.tensor_ids("model/"))
    names = [t.removeprefix("model/") for t in reader.tensor_ids("model/")]
    names.sort(key=lambda n: order.index(n) if n in order else len(order))
    return reader.config, {n: reader.assemble(f"model/{n}", whole(reader.shape(f"model/{n}"))) for n in names}


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: Any | None = None,
    *,
    placement: Placement | None = None,
    restore_rng: bool = True,
    rng_tracker: Any = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Load model (and optimizer, RNG) state in place from any layout; returns the trainer state.

    `placement` is this rank's place in the current layout (default: one process). RNG states are
    restored only when the layout is the one that saved (other layouts keep their fresh seeds).
    With `tokenizer`, a checkpoint trained with a different tokenizer file is refused.
    """
    reader = open_checkpoint(path)
    placement = placement or _single_placement()
    check_architecture(reader.config.model, model_config_of(model), reader.path)
    _check_tokenizer(reader, tokenizer)
    reader.prefetch(_requests(reader, model, placement, with_optimizer=optimizer is not None))
    load_model(reader, model, placement)
    if optimizer is not None and reader.metadata.get("optimizer"):
        load_optimizer(reader, optimizer, model, placement)
    if restore_rng:
        _restore_rng(reader, placement, rng_tracker)
    return {**reader.trainer_state, "path": str(reader.path)}


def load_model_weights(path: str | Path, model: nn.Module, placement: Placement | None = None) -> Path:
    """Only the weights (e.g. `train.init_from`), into a model sharded at any layout."""
    reader = open_checkpoint(path)
    check_architecture(reader.config.model, model_config_of(model), reader.path)
    placement = placement or _single_placement()
    reader.prefetch(_requests(reader, model, placement, with_optimizer=False))
    load_model(reader, model, placement)
    return reader.path


def check_tensor_index(metadata: Any, manifest: Mapping[str, Any], where: Path) -> None:
    """metadata.json's tensors are well formed, their pieces lie in files the manifest lists, and
    the pieces of each tensor tile it exactly once; CheckpointError naming the tensor otherwise."""
    tensors = metadata.get("tensors") if isinstance(metadata, dict) else None
    if not isinstance(tensors, dict) or not isinstance(metadata.get("layout"), dict):
        raise CheckpointError(f"{where} is not valid checkpoint metadata (no tensors or layout)")
    for tensor_id, entry in tensors.items():
        try:
            shape, pieces = _ints(entry["shape"]), entry["pieces"]
            boxes = [Box(_ints(p["offsets"]), _ints(p["shape"])) for p in pieces]
            sources = [(p["file"], p["key"]) for p in pieces]
            known_dtype = entry["dtype"] in _DTYPE_NAMES.values()
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: tensor {tensor_id!r} has a malformed entry ({e!r})") from e
        if not known_dtype:
            raise CheckpointError(f"{where}: tensor {tensor_id!r} has an unknown dtype {entry['dtype']!r}")
        for file, key in sources:
            if not isinstance(file, str) or file not in manifest or not isinstance(key, str):
                raise CheckpointError(
                    f"{where}: tensor {tensor_id!r} has a piece in {file!r}, which {MANIFEST} does not list"
                )
        check_tiling(tensor_id, shape, boxes, str(where))


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise TypeError(f"{value!r} is not a list of integers")
    return tuple(value)


def _single_placement() -> Placement:
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise CheckpointError("loading on several ranks needs placement= (Placement.from_config(cfg))")
    return Placement()


def check_architecture(saved: ModelConfig, target: ModelConfig, where: Path) -> None:
    diffs = [f"{k}: {getattr(saved, k)} != {getattr(target, k)}" for k in ARCHITECTURE
             if getattr(saved, k) != getattr(target, k)]  # fmt: skip
    if diffs:
        raise CheckpointError(f"{where} holds another architecture than the model ({'; '.join(diffs)})")


def _check_tokenizer(reader: CheckpointReader, tokenizer: str | None) -> None:
    saved, current = reader.trainer_state.get("tokenizer_sha256"), tokenizer_sha256(tokenizer or "")
    if saved and current and saved != current:
        raise CheckpointError(
            f"{reader.path} was trained with another tokenizer than data.tokenizer={tokenizer} (sha256 "
            f"{saved[:12]}... != {current[:12]}...); use the tokenizer the run started with"
        )


def _restore_rng(reader: CheckpointReader, placement: Placement, tracker: Any) -> None:
    name = placement.file_name("rng", "json")
    if reader.metadata["layout"] != placement.describe() or name not in reader.manifest:
        warnings.warn(
            f"{reader.path}: random states not restored (saved at layout {reader.metadata['layout']}, "
            f"loading at {placement.describe()}); random streams start from the seed",
            stacklevel=3,
        )
        return
    restore_rng(reader.read_json(name), tracker)


# --------------------------------------------------------------------------------------------- model
def _spec_for(reader: CheckpointReader, name: str, tensor_id: str, cfg: ModelConfig, placement: Placement):
    _, _, tp_rank = placement.coords
    return shard_spec(name, reader.shape(tensor_id), cfg, tp_rank, placement.layout.tp)


def _requests(
    reader: CheckpointReader, model: nn.Module, placement: Placement, with_optimizer: bool
) -> Iterator[tuple[str, ShardSpec]]:
    """The (tensor, spec) this rank will read, so that their files can be verified up front."""
    cfg = model_config_of(model)
    keys = ADAM_TENSORS if with_optimizer else ()
    for local, _ in model.named_parameters():
        name = global_name(local, cfg)
        for tensor_id in (f"model/{name}", *(f"optimizer/{name}/{k}" for k in keys)):
            if reader.has(tensor_id):
                yield tensor_id, _spec_for(reader, name, tensor_id, cfg, placement)


@torch.no_grad()
def load_model(reader: CheckpointReader, model: nn.Module, placement: Placement) -> None:
    """Copy every local parameter's shard in place (views into flat buffers stay views)."""
    cfg = model_config_of(model)
    for local, param in model.named_parameters():
        name = global_name(local, cfg)
        tensor_id = f"model/{name}"
        if not reader.has(tensor_id):
            raise CheckpointError(f"{reader.path} holds no weights for parameter {name}")
        spec = _spec_for(reader, name, tensor_id, cfg, placement)
        if tuple(param.shape) != spec.local_shape(reader.shape(tensor_id)):
            raise CheckpointError(
                f"{reader.path}: {name} is {reader.shape(tensor_id)} in the checkpoint; this rank's shard "
                f"would be {spec.local_shape(reader.shape(tensor_id))} but the model has {tuple(param.shape)}"
            )
        master = f"optimizer/{name}/master_param"  # fp32 masters of a half-precision run are exact
        if param.dtype == torch.float32 and reader.has(master):
            tensor_id = master
        flat, start = local_shard(param)  # (FSDP2: this rank's rows of the tensor-parallel shard)
        flat.copy_(reader.assemble(tensor_id, spec).view(-1)[start : start + flat.numel()])


# --------------------------------------------------------------------------------------------- optimizer
def _local_state(
    reader: CheckpointReader, name: str, key: str, cfg: ModelConfig, placement: Placement
) -> torch.Tensor | None:
    """This rank's whole shard of optimizer tensor `key` of parameter `name`, flattened (or None)."""
    tensor_id = f"optimizer/{name}/{key}"
    if not reader.has(tensor_id):
        return None
    return reader.assemble(tensor_id, _spec_for(reader, name, tensor_id, cfg, placement)).reshape(-1)


def _hyper(saved_group: dict[str, Any]) -> dict[str, Any]:
    hyper = {k: saved_group[k] for k in HYPER_PARAMETERS if k in saved_group}
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    return hyper


def load_optimizer(reader: CheckpointReader, optimizer: Any, model: nn.Module, placement: Placement) -> None:
    saved = reader.metadata["optimizer"]
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{reader.path}: the optimizer state has {len(saved['param_groups'])} parameter groups, this "
            f"optimizer {len(optimizer.param_groups)} (was optim.decay_norms_and_embeddings changed?)"
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        _load_torch_optimizer(reader, optimizer, model, placement)
    else:
        _load_fragment_optimizer(reader, optimizer, model, placement)


def _adam_entry(reader, name, cfg, placement, start: int, stop: int) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key in ("exp_avg", "exp_avg_sq"):
        full = _local_state(reader, name, key, cfg, placement)
        if full is not None:
            entry[key] = full[start:stop]
    if entry:
        steps = reader.metadata["optimizer"]["steps"]
        if name not in steps:
            raise CheckpointError(f"{reader.path / METADATA}: no Adam step count for {name}")
        entry["step"] = torch.tensor(steps[name], dtype=torch.float32)
    return entry


def _load_torch_optimizer(reader, optimizer: torch.optim.Optimizer, model: nn.Module, placement) -> None:
    cfg = model_config_of(model)
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, reader.metadata["optimizer"]["param_groups"]):
        ids = []
        for p in group["params"]:
            entry = _adam_entry(reader, global_name(names[id(p)], cfg), cfg, placement, 0, p.numel())
            if entry:
                state[index] = {k: v.view(p.shape) if k != "step" else v for k, v in entry.items()}
            ids.append(index)
            index += 1
        rest = {k: v for k, v in group.items() if k != "params"}
        groups.append({**rest, **_hyper(saved), "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_fragment_optimizer(reader, optimizer: Any, model: nn.Module, placement) -> None:
    """The parallel optimizers: entries hold this rank's fragment [shard_start, shard_stop)."""
    cfg = model_config_of(model)
    current = optimizer.state_dict()
    ordered = [n for group in current["param_groups"] for n in group["param_names"]]
    entries = {}
    for index, own in current["state"].items():
        name = global_name(ordered[int(index)], cfg)
        start, stop = own["shard_start"], own["shard_stop"]
        entry = {"shard_start": start, "shard_stop": stop, "numel": own["numel"]}
        entry.update(_adam_entry(reader, name, cfg, placement, start, stop))
        if "master_param" in own:  # a half-precision parameter: its fp32 master, exact when saved
            master = _local_state(reader, name, "master_param", cfg, placement)
            if master is None:
                master = reader.assemble(
                    f"model/{name}", _spec_for(reader, name, f"model/{name}", cfg, placement)
                )
            entry["master_param"] = master.reshape(-1)[start:stop].float()
        entries[index] = entry
    groups = [_hyper(saved) for saved in reader.metadata["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
