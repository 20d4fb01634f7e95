"""Where a rank's tensors sit inside the full (global) tensors, and assembling any slice back.

Every stored piece is a *box* of a full tensor: its offsets and shape in the global tensor, as in
metadata.json. Layout conversions then reduce to box intersections, whatever wrote the pieces.

A tensor-parallel shard (parallel/sharding.py) is not always one box: rank r's fused qkv weight is
its q rows, then its k rows, then its v rows, and gate_up is a chunk of each half. Every rule cuts
along one dimension, so a shard is described by a `ShardSpec`: the global index ranges along `dim`
that, concatenated in order, make the shard. Replicated values (norm weights, KV heads shared by
several tensor ranks under multi-query attention) appear in several ranks' specs; the lowest
tensor rank holding a range owns it and is the only one to write it.

An optimizer fragment (ZeRO) is a flat range [start, stop) of the flattened local shard. It is cut
into at most three row boxes of the shard (partial first row, whole rows, partial last row) and
each is mapped to global coordinates through the spec, so optimizer state is stored in the same
global boxes as the weights and reshards the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_andromeda.checkpoint.storage import CheckpointError
from megatron_andromeda.config import ModelConfig
from megatron_andromeda.parallel.sharding import qkv_rows, split_kind


@dataclass(frozen=True)
class Box:
    """A block of a tensor: `shape` elements starting at `offsets`."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """Index of this box inside a tensor whose element 0 sits at `origin` (default: the global 0)."""
        origin = origin or (0,) * len(self.offsets)
        return tuple(slice(o - z, o - z + n) for o, z, n in zip(self.offsets, origin, self.shape))

    def intersect(self, other: Box) -> Box | None:
        starts = [max(a, b) for a, b in zip(self.offsets, other.offsets)]
        stops = [
            min(a + n, b + m) for a, n, b, m in zip(self.offsets, self.shape, other.offsets, other.shape)
        ]
        if any(start >= stop for start, stop in zip(starts, stops)):
            return None
        return Box(tuple(starts), tuple(stop - start for start, stop in zip(starts, stops)))

    def to_json(self) -> dict[str, list[int]]:
        return {"offsets": list(self.offsets), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, raw: dict) -> Box:
        return cls(tuple(raw["offsets"]), tuple(raw["shape"]))


@dataclass(frozen=True)
class ShardSpec:
    """A shard = the global ranges `ranges` along `dim`, concatenated in this order."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    def local_shape(self, global_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(global_shape)
        shape[self.dim] = sum(stop - start for start, stop in self.ranges)
        return tuple(shape)

    def range_box(self, index: int, global_shape: Sequence[int]) -> Box:
        start, stop = self.ranges[index]
        offsets, shape = [0] * len(global_shape), list(global_shape)
        offsets[self.dim], shape[self.dim] = start, stop - start
        return Box(tuple(offsets), tuple(shape))

    def local_starts(self) -> list[int]:
        starts, at = [], 0
        for start, stop in self.ranges:
            starts.append(at)
            at += stop - start
        return starts


def whole(global_shape: Sequence[int]) -> ShardSpec:
    return ShardSpec(0, ((0, global_shape[0]),)) if global_shape else ShardSpec(0, ())


def shard_spec(name: str, global_shape: Sequence[int], cfg: ModelConfig, rank: int, tp: int) -> ShardSpec:
    """The spec of tensor rank `rank`'s shard of parameter `name` (same rules as sharding.shard_param)."""
    kind = split_kind(name)
    if tp == 1 or kind == "replicated":
        return whole(global_shape)
    if kind == "qkv":
        return ShardSpec(0, tuple((s.start, s.stop) for s in qkv_rows(cfg, rank, tp)))
    dim = 1 if kind == "columns" else 0
    size = global_shape[dim] // (2 if kind == "gate_up" else 1)
    if size % tp:
        raise CheckpointError(
            f"{name}: dim {dim} of shape {tuple(global_shape)} does not split over tensor degree {tp}"
        )
    n = size // tp
    if kind == "gate_up":
        return ShardSpec(0, ((rank * n, (rank + 1) * n), (size + rank * n, size + (rank + 1) * n)))
    return ShardSpec(dim, ((rank * n, (rank + 1) * n),))


def owned_ranges(name: str, global_shape: Sequence[int], cfg: ModelConfig, rank: int, tp: int) -> list[bool]:
    """For each range of rank `rank`'s spec: True unless a lower tensor rank holds the same range."""
    mine = shard_spec(name, global_shape, cfg, rank, tp)
    below = {r for other in range(rank) for r in shard_spec(name, global_shape, cfg, other, tp).ranges}
    return [r not in below for r in mine.ranges]


# ------------------------------------------------------------------------------------------ local -> global
def flat_boxes(shape: Sequence[int], start: int, stop: int) -> Iterator[tuple[int, Box]]:
    """Elements [start, stop) of a flattened 1-D or 2-D tensor as (flat offset, box) row blocks."""
    if len(shape) == 1:
        if start < stop:
            yield start, Box((start,), (stop - start,))
        return
    if len(shape) != 2:
        raise CheckpointError(f"cannot store a fragment of a {len(shape)}-D tensor (1-D and 2-D only)")
    cols = shape[1]
    if cols == 0 or start >= stop:
        return
    (r0, c0), (r1, c1) = divmod(start, cols), divmod(stop, cols)
    if r0 == r1:
        yield start, Box((r0, c0), (1, c1 - c0))
        return
    if c0:
        yield start, Box((r0, c0), (1, cols - c0))
        r0 += 1
    if r1 > r0:
        yield r0 * cols, Box((r0, 0), (r1 - r0, cols))
    if c1:
        yield r1 * cols, Box((r1, 0), (1, c1))


def global_pieces(
    flat: torch.Tensor, start: int, spec: ShardSpec, global_shape: Sequence[int], owned: Sequence[bool]
) -> Iterator[tuple[Box, torch.Tensor]]:
    """(global box, tensor) pieces of `flat`, elements [start, start + len) of a flattened local shard.

    A whole shard is flat = shard.reshape(-1), start = 0. Ranges not owned are left out.
    """
    local_shape = spec.local_shape(global_shape)
    dim, local_starts = spec.dim, spec.local_starts()
    for offset, box in flat_boxes(local_shape, start, start + flat.numel()):
        data = flat[offset - start : offset - start + box.numel].view(box.shape)
        lo, hi = box.offsets[dim], box.offsets[dim] + box.shape[dim]
        for (g_start, g_stop), local, own in zip(spec.ranges, local_starts, owned):
            a, b = max(lo, local), min(hi, local + g_stop - g_start)
            if a >= b or not own:
                continue
            offsets, shape = list(box.offsets), list(box.shape)
            offsets[dim], shape[dim] = g_start + a - local, b - a
            yield Box(tuple(offsets), tuple(shape)), data.narrow(dim, a - lo, b - a)


# ------------------------------------------------------------------------------------------ global -> local
@dataclass(frozen=True)
class StoredPiece:
    file: str
    key: str
    box: Box


ReadFn = Callable[[StoredPiece, Box], torch.Tensor]


def assemble(
    name: str,
    spec: ShardSpec,
    global_shape: Sequence[int],
    pieces: Sequence[StoredPiece],
    read: ReadFn,
    dtype: torch.dtype,
) -> torch.Tensor:
    """This rank's shard (per `spec`) of global tensor `name`, copied out of the stored pieces.

    `read(piece, box)` returns the part `box` (global coordinates) of a stored piece. Every element
    of the shard must be covered: the stored pieces never overlap (check_tiling, run when a
    checkpoint is opened), so counting suffices.
    """
    out = torch.empty(spec.local_shape(global_shape), dtype=dtype)
    covered = 0
    for index, local in enumerate(spec.local_starts()):
        want = spec.range_box(index, global_shape)
        origin = list(want.offsets)
        origin[spec.dim] -= local  # global coordinates of out's element 0 along dim
        for piece in pieces:
            part = want.intersect(piece.box)
            if part is not None:
                out[part.slices(origin)] = read(piece, part)
                covered += part.numel
    if covered != out.numel():
        raise CheckpointError(
            f"tensor {name}: the checkpoint holds {covered} of the {out.numel()} elements this rank "
            "needs (a rank's files are missing from metadata.json?)"
        )
    return out


# ------------------------------------------------------------------------------------------ checking pieces
def check_tiling(tensor_id: str, shape: Sequence[int], boxes: Sequence[Box], where: str) -> None:
    """The boxes cover a tensor of `shape` exactly once: within bounds, no overlap, no gap.

    assemble() only counts the elements it copies, which a piece listed twice satisfies while
    another part of the tensor stays uninitialised: so a checkpoint's pieces are checked here, when
    it is opened, before any weight is used. `where` names the file the pieces come from.
    """
    name = f"{where}: tensor {tensor_id} of shape {tuple(shape)}"
    for box in boxes:
        inside = len(box.offsets) == len(box.shape) == len(shape) and all(
            o >= 0 and n >= 0 and o + n <= size for o, n, size in zip(box.offsets, box.shape, shape)
        )
        if not inside:
            raise CheckpointError(
                f"{name}: the piece at {list(box.offsets)} of shape {list(box.shape)} lies outside it"
            )
    _check_no_overlap(name, [b for b in boxes if b.numel])
    covered = sum(b.numel for b in boxes)
    if covered != math.prod(shape):
        raise CheckpointError(
            f"{name}: its pieces cover {covered} of its {math.prod(shape)} elements (a piece is missing)"
        )


def _check_no_overlap(name: str, boxes: list[Box]) -> None:
    """A sweep along dim 0: each box is compared only with the boxes whose rows it shares."""
    if boxes and not boxes[0].offsets:  # a scalar: one piece at most
        if len(boxes) > 1:
            raise CheckpointError(f"{name}: {len(boxes)} pieces hold the one element")
        return
    active: list[Box] = []
    for box in sorted(boxes, key=lambda b: b.offsets):
        active = [a for a in active if a.offsets[0] + a.shape[0] > box.offsets[0]]
        for other in active:
            if other.intersect(box) is not None:
                raise CheckpointError(
                    f"{name}: the pieces at {list(other.offsets)} (shape {list(other.shape)}) and at "
                    f"{list(box.offsets)} (shape {list(box.shape)}) overlap (a piece listed twice?)"
                )
        active.append(box)
