"""The parallel context: one object that knows this rank's place in the world and holds every group.

The layout (layout.py: rank order, stages, batch arithmetic) is validated before any process group
exists; `ParallelContext` adds the process groups, built once from it and passed explicitly to
whatever communicates. Nothing reads a global group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, TextIO

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from megatron_andromeda.errors import ConfigError
from megatron_andromeda.parallel.layout import RankLayout, RunLayout, plan_layout
from megatron_andromeda.parallel.random import RNGTracker, tensor_parallel_seed

if TYPE_CHECKING:
    from megatron_andromeda.config import RunConfig


# --------------------------------------------------------------------------------------------- context
@dataclass
class ParallelContext:
    """This rank's coordinates, its process groups and its tensor-parallel RNG streams.

    A group of one process is still a real group in a distributed run; in `single()` every group is
    None and every size is 1, and the collectives in `parallel.mappings` then do nothing.
    """

    layout: RankLayout  # a RunLayout (stages, batch arithmetic) when built by init_parallel
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    stage_group: dist.ProcessGroup | None = None  # tensor x data ranks of this pipeline stage
    # Full sharding with data replicas (HSDP) only: the two halves of this rank's data group.
    dp_shard_group: dist.ProcessGroup | None = None
    dp_replicate_group: dist.ProcessGroup | None = None
    # Full sharding only: the world as a DeviceMesh over the groups above (see device_mesh()).
    mesh: DeviceMesh | None = None
    rng: RNGTracker = field(default_factory=RNGTracker)
    # What close() stops before the groups go (e.g. the pipeline watchdog's thread), newest first.
    _on_close: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def single(
        cls, device: str | torch.device = "cpu", seed: int = 1234, layout: RunLayout | None = None
    ) -> ParallelContext:
        ctx = cls(layout=layout or RankLayout(1, 1, 1), device=torch.device(device))
        ctx.rng.add("tensor-parallel", tensor_parallel_seed(seed, 0, 0))
        return ctx

    @classmethod
    def build(
        cls,
        layout: RankLayout,
        *,
        device: str | torch.device = "cpu",
        local_rank: int = 0,
        seed: int = 1234,
        timeout_s: float | None = None,
    ) -> ParallelContext:
        """Create every group of `layout`; call on all ranks after `init_process_group`."""
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelContext.build needs torch.distributed initialised (see init_parallel)"
            )
        if dist.get_world_size() != layout.world_size:
            raise ConfigError(f"world size {dist.get_world_size()} != layout size {layout.world_size}")
        rank = dist.get_rank()
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        groups = {}
        # Every rank must call new_group for every group, in the same order.
        for name, members in _group_tables(layout):
            for ranks in members:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    groups[name] = group
        ctx = cls(layout=layout, rank=rank, local_rank=local_rank, device=torch.device(device), **groups)
        ctx.rng.add("tensor-parallel", tensor_parallel_seed(seed, ctx.tp_rank, ctx.pp_rank))
        if isinstance(layout, RunLayout) and layout.fully_sharded:
            ctx.mesh = device_mesh(ctx)
        return ctx

    # ------------------------------------------------------------------------------------------ coordinates
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def distributed(self) -> bool:
        return self.tp_group is not None

    @property
    def data_mesh(self) -> DeviceMesh:
        """The data dimension(s) of the mesh, what full sharding shards over: ("data",), or
        ("data_replicate", "data_shard") under HSDP."""
        if self.mesh is None:
            raise ValueError("the context has no device mesh: its layout does not shard fully")
        names = self.mesh.mesh_dim_names
        return self.mesh["data"] if "data" in names else self.mesh["data_replicate", "data_shard"]

    def on_close(self, callback: Callable[[], None]) -> None:
        """Have close() call `callback` (stop a thread that uses these groups or their store) first."""
        self._on_close.append(callback)

    def close(self, *, clean: bool = True) -> None:
        """The orderly end of a run: stop what registered with on_close, then (several processes)
        wait for every rank and destroy the process groups, once. Safe to call twice.

        The barrier keeps a rank from tearing its groups down while a peer still talks to it. A rank
        leaving on an error passes clean=False: it skips the barrier, which peers stuck elsewhere
        would never reach, and only destroys its own groups.
        """
        while self._on_close:
            self._on_close.pop()()
        if not (self.distributed and dist.is_initialized()):
            return
        if clean:
            dist.barrier(group=dist.group.WORLD)
        dist.destroy_process_group()

    def print_layout(self, file: TextIO | None = None) -> None:
        """Print the rank layout once (on global rank 0)."""
        if self.rank == 0:
            print(self.layout.describe(), file=file or sys.stdout, flush=True)


def _group_tables(layout: RankLayout) -> list[tuple[str, list[list[int]]]]:
    """(context field, the layout's groups of that kind), in the order every rank creates them."""
    tables = [
        ("tp_group", layout.tp_groups()),
        ("dp_group", layout.dp_groups()),
        ("pp_group", layout.pp_groups()),
        ("embedding_group", layout.embedding_groups()),
        ("mp_group", layout.model_parallel_groups()),
        ("stage_group", layout.stage_groups()),
    ]
    if isinstance(layout, RunLayout) and layout.fully_sharded and layout.data_replicas > 1:
        tables += [
            ("dp_shard_group", layout.dp_shard_groups()),
            ("dp_replicate_group", layout.dp_replicate_groups()),
        ]
    return tables


def device_mesh(ctx: ParallelContext) -> DeviceMesh:
    """The world as a torch DeviceMesh whose coordinates are the rank layout's, built on ctx's groups.

    Dimensions (pipeline, data, tensor), or (pipeline, data_replicate, data_shard, tensor) under
    HSDP; the mesh is the layout's rank order, so a rank's mesh coordinate is its (pp, dp, tp) and no
    group is created twice. Full sharding hands its data dimension(s) to FSDP2 (`data_mesh`); the
    tensor dimension is our own tensor parallelism (plain local shards, not DTensor), which FSDP2
    never sees: it shards what each tensor rank holds.
    """
    lay = run_layout_of(ctx)
    if lay.data_replicas > 1:
        shape = (lay.pp, lay.data_replicas, lay.data_shards, lay.tp)
        names = ("pipeline", "data_replicate", "data_shard", "tensor")
        groups = [ctx.pp_group, ctx.dp_replicate_group, ctx.dp_shard_group, ctx.tp_group]
    else:
        shape, names = (lay.pp, lay.dp, lay.tp), ("pipeline", "data", "tensor")
        groups = [ctx.pp_group, ctx.dp_group, ctx.tp_group]
    ranks = torch.arange(lay.world_size, dtype=torch.int).view(shape)
    return DeviceMesh.from_group(groups, ctx.device.type, mesh=ranks, mesh_dim_names=names)


def run_layout_of(ctx: ParallelContext) -> RunLayout:
    if not isinstance(ctx.layout, RunLayout):
        raise ValueError("this needs the run's layout (a RunLayout from plan_layout)")
    return ctx.layout


# --------------------------------------------------------------------------------------------- launch
def restart_safe_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's own store, under a key prefix per restart attempt (None: rendezvous as env:// does).

    torchrun (`--max-restarts`) hands its workers the agent's TCPStore and keeps it across restarts;
    the default process group's keys carry no attempt number, so a restarted gloo worker can read
    the dead attempt's addresses and fail to connect (seen with torch 2.13). A prefix per attempt
    keeps the attempts apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=False, timeout=timeout,
    )  # fmt: skip
    return dist.PrefixStore(f"andromeda/attempt{attempt}", agent_store)


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(run_cfg: RunConfig, layout: RunLayout | None = None) -> ParallelContext:
    """Build the context for this process from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    `layout` is the run's validated layout (`plan_layout(run_cfg, world_size)`, planned here when
    not given), so a bad launch fails before any process group exists. One process (WORLD_SIZE
    unset or 1) gets `ParallelContext.single()`. The backend is NCCL on CUDA, gloo otherwise; with
    CUDA each process uses device LOCAL_RANK.
    """
    world_size = world_size_from_env()
    if layout is None:
        layout = plan_layout(run_cfg, world_size)
    elif layout.world_size != world_size:
        raise ConfigError(f"the layout is for {layout.world_size} processes but WORLD_SIZE={world_size}")
    wanted = run_cfg.train.device
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return ParallelContext.single(device, seed=run_cfg.train.seed, layout=layout)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ConfigError("WORLD_SIZE > 1 but RANK/MASTER_ADDR are unset: launch with torchrun")
    timeout = timedelta(seconds=run_cfg.parallel.comm_timeout_s)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=timeout,
        device_id=device if use_cuda else None,
        store=restart_safe_store(world_size, timeout),
    )
    ctx = ParallelContext.build(
        layout,
        device=device,
        local_rank=local_rank,
        seed=run_cfg.train.seed,
        timeout_s=run_cfg.parallel.comm_timeout_s,
    )
    ctx.print_layout()
    return ctx
