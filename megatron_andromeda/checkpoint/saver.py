"""Saving: every rank snapshots its pieces, writes its own files, and rank 0 commits (storage.py).

    checkpointer = Checkpointer(cfg)                      # placement from cfg + torch.distributed
    checkpointer.save(step, model, optimizer, trainer_state)
    ...
    checkpointer.wait()                                   # before exit: the last save is committed
    checkpointer.close()                                  # on any exit: no save thread outlives it

With `checkpoint.async_save` the state is first copied to host memory (the only part training
waits for) and a background thread writes it; the bytes are those of a synchronous save. At most
one save is in flight: the next `save` first waits for the previous one. The only collective is a
barrier in the calling thread when a save starts (rank 0 has prepared the temporary directory) and,
for a blocking save, one after the commit; the background thread talks to other ranks only through
marker files, so it never races the training loop's collectives.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.checkpoint.state import (
    Piece,
    Placement,
    global_name,
    is_tied_copy,
    model_config_of,
    model_pieces,
    optimizer_fragments,
    optimizer_pieces,
    optimizer_steps,
    rng_state,
)
from megatron_andromeda.checkpoint.storage import (
    FORMAT,
    CheckpointError,
    finish_checkpoint,
    in_parallel,
    prepare_tmp_dir,
    publish_latest,
    step_dir_name,
    tmp_dir_for,
    wait_for_markers,
    write_json,
    write_marker,
    write_safetensors,
)
from megatron_andromeda.config import RunConfig


@dataclass
class RankPayload:
    """Everything one rank writes, already in host memory."""

    rank: int
    tensor_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # file -> key -> tensor
    index: dict[str, dict[str, Any]] = field(default_factory=dict)  # tensor id -> shape, dtype, pieces
    json_files: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None  # param groups and Adam step counts of this rank's parameters

    def add(self, file: str, pieces: Iterable[Piece], copy: bool, buffers: dict | None = None) -> None:
        """Add pieces to `file`; with `copy`, into private host tensors (reused from `buffers`)."""
        for piece in pieces:
            key = piece.tensor_id.split("/", 1)[1]
            if piece.box.shape != piece.global_shape:
                key += "@" + ",".join(map(str, piece.box.offsets))
            host = _to_host(piece.data, copy, None if buffers is None else buffers.get((file, key)))
            if buffers is not None and copy:
                buffers[(file, key)] = host
            self.tensor_files.setdefault(file, {})[key] = host
            entry = self.index.setdefault(
                piece.tensor_id,
                {"shape": list(piece.global_shape), "dtype": _dtype_name(piece.data.dtype), "pieces": []},
            )
            entry["pieces"].append({"file": file, "key": key, **piece.box.to_json()})


def _to_host(t: torch.Tensor, copy: bool, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous CPU tensor; a private copy when training may change `t` before it is written.

    Copies go into `buffer` when it fits: fresh memory costs page faults that take longer than
    the copy itself. From the GPU they are pinned so that they overlap (synchronised in snapshot()).
    """
    if t.device.type == "cpu" and not copy:
        return t if t.is_contiguous() else t.contiguous()
    if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    return buffer.copy_(t, non_blocking=t.device.type == "cuda")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def snapshot(
    placement: Placement,
    model: nn.Module,
    optimizer: Any | None,
    json_files: dict[str, Any],
    *,
    copy: bool,
    rng: dict[str, Any] | None = None,
    buffers: dict | None = None,
) -> RankPayload:
    """This rank's payload: its owned model and optimizer pieces, RNG state and (rank 0) JSON files.

    With `copy` the tensors are private host copies (into `buffers` when given: see _to_host).
    """
    payload = RankPayload(placement.rank, json_files=dict(json_files))
    payload.add(placement.file_name("model"), model_pieces(model, placement), copy, buffers)
    if optimizer is not None:
        fragments, groups = optimizer_fragments(optimizer, model)
        pieces = optimizer_pieces(fragments, model, placement)
        payload.add(placement.file_name("optimizer"), pieces, copy, buffers)
        cfg = model_config_of(model)
        for group in groups:  # global names, the tied copy left out
            group["params"] = [global_name(n, cfg) for n in group["params"] if not is_tied_copy(n, cfg)]
        payload.optimizer = {"param_groups": groups, "steps": optimizer_steps(fragments, model)}
    if rng is not None:
        payload.json_files[placement.file_name("rng", "json")] = rng
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return payload


def write_payload(tmp: Path, payload: RankPayload) -> None:
    """Write a payload's files into `tmp`, then its marker (an error marker if writing failed)."""
    try:
        names = list(payload.tensor_files)
        written = in_parallel(lambda n: write_safetensors(tmp / n, payload.tensor_files[n]), names)
        files = dict(zip(names, written))
        files.update({name: write_json(tmp / name, obj) for name, obj in payload.json_files.items()})
    except BaseException as e:
        write_marker(tmp, payload.rank, {"rank": payload.rank, "error": f"{type(e).__name__}: {e}"})
        raise
    report = {"rank": payload.rank, "files": files, "tensors": payload.index, "optimizer": payload.optimizer}
    write_marker(tmp, payload.rank, report)


def commit(
    tmp: Path,
    final: Path,
    reports: list[dict[str, Any]],
    layout: dict[str, Any],
    *,
    publish: bool,
    keep_last: int | None = None,
) -> None:
    """Rank 0: merge the ranks' reports into metadata.json and the manifest, rename, then `latest`.

    With `publish`, `latest` in final's parent (a save root) then names it, and only the newest
    `keep_last` complete checkpoints there are kept (all when None).
    """
    files: dict[str, Any] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for report in reports:
        files.update(report["files"])
        for tensor_id, entry in report["tensors"].items():
            merged = tensors.setdefault(tensor_id, {**entry, "pieces": []})
            if (merged["shape"], merged["dtype"]) != (entry["shape"], entry["dtype"]):
                raise CheckpointError(f"ranks disagree on the shape or dtype of {tensor_id}")
            merged["pieces"].extend(entry["pieces"])
    metadata = {
        "format": FORMAT,
        "layout": layout,
        "tensors": dict(sorted(tensors.items())),
        "optimizer": _merge_optimizer([r["optimizer"] for r in reports if r.get("optimizer")]),
    }
    finish_checkpoint(tmp, final, metadata, files)
    if publish:
        publish_latest(final.parent, final, keep_last)


def _merge_optimizer(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    groups = [dict(g, params=list(g["params"])) for g in parts[0]["param_groups"]]
    steps: dict[str, float] = {}
    for part in parts:
        if len(part["param_groups"]) != len(groups):
            raise CheckpointError("ranks disagree on the number of optimizer parameter groups")
        for group, theirs in zip(groups, part["param_groups"]):
            group["params"].extend(n for n in theirs["params"] if n not in group["params"])
        steps.update(part["steps"])
    return {"param_groups": groups, "steps": dict(sorted(steps.items()))}


def tokenizer_sha256(path: str) -> str | None:
    """The tokenizer file's sha256 (recorded so that a resume with another tokenizer is caught)."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- the saver
class Checkpointer:
    """Saves this rank's part of each checkpoint into cfg.checkpoint.save_dir (see module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        placement: Placement | None = None,
        *,
        rng_tracker: Any = None,
        root: str | Path | None = None,
        keep_last: int | None = None,
    ):
        """`root` and `keep_last` default to cfg.checkpoint.save_dir and keep_last."""
        self.cfg = cfg
        self.placement = placement or Placement.from_config(cfg)
        self.root = Path(root or cfg.checkpoint.save_dir)
        self.keep_last = keep_last or cfg.checkpoint.keep_last
        self.rng_tracker = rng_tracker
        self.timeout_s = cfg.parallel.comm_timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Host copies of the last async save, reused by the next one (at most one is in flight).
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def save(
        self, step: int, model: nn.Module, optimizer: Any | None, trainer_state: dict[str, Any], *,
        blocking: bool = False,
    ) -> Path:  # fmt: skip
        """Save `step`; returns the checkpoint's final path (complete once the save has finished).

        Blocking saves (checkpoint.async_save off, or `blocking=True`) return when the checkpoint is
        committed on every rank; others return as soon as the state is in host memory.
        """
        if self.root == Path():
            raise CheckpointError("checkpoint.save_dir is empty: set it to save checkpoints")
        self._join()
        background = self.cfg.checkpoint.async_save and not blocking
        final = self.root / step_dir_name(step)
        json_files = {}
        if self.placement.rank == 0:
            state = {
                **trainer_state,
                "step": step,
                "tokenizer_sha256": tokenizer_sha256(self.cfg.data.tokenizer),
            }
            json_files = {"config.json": self.cfg.to_dict(), "trainer_state.json": state}
        payload = snapshot(
            self.placement, model, optimizer, json_files, copy=background, rng=rng_state(self.rng_tracker),
            buffers=self._buffers,
        )  # fmt: skip
        if self.placement.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            prepare_tmp_dir(final)
        self._barrier()  # nobody writes before the temporary directory is fresh
        job = partial(self._write_and_commit, payload, final)
        if background:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-{step}")
            self._thread.start()
        else:
            job()
            self._barrier()
        return final

    def wait(self) -> None:
        """Block until the save in flight is committed (call on every rank: ends with a barrier)."""
        self._join()
        self._barrier()

    def close(self, timeout_s: float | None = None) -> None:
        """Let the save in flight finish (at most timeout_s, default parallel.comm_timeout_s), no
        collective, so that a rank leaving on an error may call it too. Reports, never raises: a
        failed or unfinished save leaves `latest` on the previous checkpoint."""
        thread, rank = self._thread, self.placement.rank
        if thread is not None:
            thread.join(self.timeout_s if timeout_s is None else timeout_s)
            if thread.is_alive():
                _warn(f"[rank {rank}] the background save {thread.name} did not finish in time; "
                      "`latest` still names the previous checkpoint")  # fmt: skip
                return
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            _warn(f"[rank {rank}] the background checkpoint save failed: {error}")

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _write_and_commit(self, payload: RankPayload, final: Path) -> None:
        tmp = tmp_dir_for(final)
        write_payload(tmp, payload)
        if self.placement.rank == 0:
            reports = wait_for_markers(tmp, self.placement.world, self.timeout_s)
            commit(tmp, final, reports, self.placement.describe(), publish=True, keep_last=self.keep_last)

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as e:  # re-raised in the training thread by the next save / wait
            self._error = e

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {error}") from error

    def _barrier(self) -> None:
        if self.placement.world > 1:
            dist.barrier(group=dist.group.WORLD)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    config: RunConfig,
    model: nn.Module,
    optimizer: Any | None,
    trainer_state: dict[str, Any],
    keep_last: int = 3,
    placement: Placement | None = None,
) -> Path:
    """A blocking save of `step` under `root` (one process unless `placement` says otherwise)."""
    checkpointer = Checkpointer(config, placement or Placement(), root=root, keep_last=keep_last)
    return checkpointer.save(step, model, optimizer, trainer_state, blocking=True)
