"""The parallel context: one object that knows this rank's place in the world and holds every group.

Layout (Megatron's order, see README.md in this folder): the tensor rank varies fastest, then the
data rank, then the pipeline rank,

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a tensor group is `tp` consecutive ranks (one node's fast links) and pipeline neighbours are
`dp * tp` ranks apart. `RankLayout` is the pure arithmetic (usable with no process group, e.g. to
validate a config or print the layout before launch); `ParallelContext` adds the process groups,
built once and passed explicitly to whatever communicates. Nothing reads a global group.
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

from megatron_andromeda.config import ConfigError, ModelConfig, ParallelConfig
from megatron_andromeda.parallel.random import RNGTracker, tensor_parallel_seed

if TYPE_CHECKING:
    from megatron_andromeda.config import RunConfig

VOCAB_ALIGNMENT = 128  # each rank's vocabulary shard is a multiple of this (GEMM-friendly)


def padded_vocab_size(vocab_size: int, tensor: int, multiple: int = VOCAB_ALIGNMENT) -> int:
    """The smallest size >= vocab_size divisible by tensor * multiple.

    Use it to size the embedding from a tokenizer's real vocabulary; the extra rows are never a
    target and `make_loss_fn(ctx, real_vocab_size=...)` masks their logits out of the softmax.
    """
    step = tensor * multiple
    return -(-vocab_size // step) * step


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class RankLayout:
    """Which ranks share a tensor / data / pipeline group; pure arithmetic, no process group."""

    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)
        ]

    def dp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)
        ]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline: they hold the tied embedding and sum its gradient."""
        return [sorted({g[0], g[-1]}) for g in self.pp_groups()]

    def model_parallel_groups(self) -> list[list[int]]:
        """All tp x pp ranks of one model replica: the group that sums squared norms of a sharded model."""
        return [
            [self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)
        ]

    def describe(self) -> str:
        lines = [
            f"rank layout: world {self.world_size} = tensor {self.tp} x data {self.dp} x pipeline {self.pp}"
        ]
        lines.append("  rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank")
        for title, groups in (
            ("tensor", self.tp_groups()),
            ("data", self.dp_groups()),
            ("pipeline", self.pp_groups()),
            ("embedding", self.embedding_groups()),
            ("model-parallel", self.model_parallel_groups()),
        ):
            lines.append(f"  {title + ' groups:':24s}{' '.join(str(g) for g in groups)}")
        return "\n".join(lines)


def validate_layout(
    parallel: ParallelConfig, model: ModelConfig, world_size: int, seq_length: int | None = None
) -> RankLayout:
    """Check that the parallel degrees fit the world and the model; needs no process group.

    Raises ConfigError naming the field to change. Run it before `init_process_group` so that a
    bad launch fails in seconds on every rank with the same message instead of hanging.
    """
    parallel.validate()
    tp, pp = parallel.tensor, parallel.pipeline
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor={tp} x parallel.pipeline={pp}; "
            "launch a multiple of tensor x pipeline processes or change the degrees"
        )
    dp = parallel.data if parallel.data is not None else world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ConfigError(
            f"parallel.tensor={tp} x parallel.pipeline={pp} x parallel.data={dp} = {tp * pp * dp} "
            f"!= world size {world_size}; fix the degrees or leave parallel.data unset to derive it"
        )
    check_tensor_parallel(model, tp)
    if pp > model.num_layers:
        raise ConfigError(f"parallel.pipeline={pp} exceeds model.num_layers={model.num_layers}")
    if parallel.sequence_parallel and seq_length is not None and seq_length % tp:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence over parallel.tensor={tp} ranks: "
            f"data.seq_length={seq_length} must be a multiple of {tp}"
        )
    return RankLayout(tp=tp, pp=pp, dp=dp)


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """The model shapes that a tensor degree must divide (heads, KV heads, FFN width, vocabulary)."""
    if tp == 1:
        return
    if model.num_heads % tp:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tensor={tp}: "
            "query heads are split evenly across the tensor group"
        )
    kv = model.num_kv_heads
    if kv % tp and tp % kv:
        raise ConfigError(
            f"model.num_kv_heads={kv} and parallel.tensor={tp}: one must divide the other "
            "(KV heads are split when there are at least tp of them, replicated otherwise)"
        )
    if model.ffn_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={model.ffn_size} is not divisible by parallel.tensor={tp}")
    if model.vocab_size % tp:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor={tp}; set "
            f"model.vocab_size={padded_vocab_size(model.vocab_size, tp)} "
            f"(padded to tensor x {VOCAB_ALIGNMENT}; the padding is masked out of the loss)"
        )


# --------------------------------------------------------------------------------------------- context
@dataclass
class ParallelContext:
    """This rank's coordinates, its process groups and its tensor-parallel RNG streams.

    A group of one process is still a real group in a distributed run; in `single()` every group is
    None and every size is 1, and the collectives in `parallel.mappings` then do nothing.
    """

    layout: RankLayout
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    rng: RNGTracker = field(default_factory=RNGTracker)
    # What close() stops before the groups go (e.g. the pipeline watchdog's thread), newest first.
    _on_close: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def single(cls, device: str | torch.device = "cpu", seed: int = 1234) -> ParallelContext:
        ctx = cls(layout=RankLayout(1, 1, 1), device=torch.device(device))
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
        for name, members in (
            ("tp_group", layout.tp_groups()),
            ("dp_group", layout.dp_groups()),
            ("pp_group", layout.pp_groups()),
            ("embedding_group", layout.embedding_groups()),
            ("mp_group", layout.model_parallel_groups()),
        ):
            for ranks in members:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    groups[name] = group
        ctx = cls(layout=layout, rank=rank, local_rank=local_rank, device=torch.device(device), **groups)
        ctx.rng.add("tensor-parallel", tensor_parallel_seed(seed, ctx.tp_rank, ctx.pp_rank))
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


def init_parallel(run_cfg: RunConfig) -> ParallelContext:
    """Build the context for this process from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    The layout is validated before any process group exists. One process (WORLD_SIZE unset or 1)
    gets `ParallelContext.single()`. The backend is NCCL on CUDA, gloo otherwise; with CUDA each
    process uses device LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_layout(run_cfg.parallel, run_cfg.model, world_size, run_cfg.data.seq_length)
    wanted = run_cfg.train.device
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return ParallelContext.single(device, seed=run_cfg.train.seed)
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
