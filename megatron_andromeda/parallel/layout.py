"""The run's layout, validated once before any process group: ranks, pipeline stages, batch arithmetic.

`plan_layout(cfg, world_size)` applies every rule a layout must satisfy (below) and returns a frozen
`RunLayout`; `init_parallel` builds the process groups from it and every consumer reads from it:
the pipeline builder its layer spans, the schedule its micro-batch count, the trainer its
accumulation steps and data slice, the checkpointer its placement. Nothing re-derives these values
from the config, and a bad launch fails in seconds on every rank, before `init_process_group`.

The rules are plain functions raising `ConfigError` that name the fields to change (FP8's rules
too: `check_fp8`, per tensor-parallel shard); the planner
(`megatron_andromeda/planner.py`) runs the same functions over candidate layouts.

Rank order (Megatron's): the tensor rank varies fastest, then data, then pipeline,

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a tensor group is `tp` consecutive ranks (one node's fast links) and pipeline neighbours are
`dp * tp` ranks apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_andromeda.errors import ConfigError
from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.parallel.sharding import shard_qkv_layout

if TYPE_CHECKING:
    from megatron_andromeda.config import ParallelConfig, RunConfig

VOCAB_ALIGNMENT = 128  # each rank's vocabulary shard is a multiple of this (GEMM-friendly)


def padded_vocab_size(vocab_size: int, tensor: int, multiple: int = VOCAB_ALIGNMENT) -> int:
    """The smallest size >= vocab_size divisible by tensor * multiple.

    Use it to size the embedding from a tokenizer's real vocabulary; the extra rows are never a
    target and every consumer of logits masks them (`models.gpt.mask_padding_logits`).
    """
    step = tensor * multiple
    return -(-vocab_size // step) * step


# --------------------------------------------------------------------------------------------- ranks
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

    def stage_groups(self) -> list[list[int]]:
        """All tensor x data ranks of one pipeline stage: they run the same layers (FP8 amax reduction)."""
        return [
            [self.rank_of(p, d, t) for d in range(self.dp) for t in range(self.tp)] for p in range(self.pp)
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
            ("stage", self.stage_groups()),
        ):
            lines.append(f"  {title + ' groups:':24s}{' '.join(str(g) for g in groups)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RunLayout(RankLayout):
    """A RankLayout plus everything derived from it for one run: stages, schedule, batch arithmetic.

    Built by `plan_layout` (validated) or `RunLayout.single` (one process, no pipeline).
    """

    sequence_parallel: bool = False
    stage_spans: tuple[range, ...] = ()  # the layers of each virtual stage s = chunk * pp + pp_rank
    schedule: str = "none"  # "none" (pp == 1), "gpipe", "1f1b", "interleaved"
    micro_batch_size: int = 1
    global_batch_size: int = 1
    data_sharding: str = "none"  # in effect: "none", "optimizer" (ZeRO-1) or "full" (FSDP2); none if dp == 1
    data_replicas: int = 1  # full sharding: groups of dp / data_replicas ranks shard, the groups replicate
    reshard_after_forward: bool = True  # full sharding: free gathered weights after each forward

    @classmethod
    def single(cls, num_layers: int, micro_batch_size: int = 1, global_batch_size: int | None = None):
        """One process holding the whole model."""
        gbs = global_batch_size or micro_batch_size
        check_batch(gbs, micro_batch_size, 1)
        return cls(1, 1, 1, stage_spans=(range(num_layers),), micro_batch_size=micro_batch_size,
                   global_batch_size=gbs)  # fmt: skip

    @property
    def distributed_optimizer(self) -> bool:
        """ZeRO-1 in effect: optimizer state sharded, parameters and gradients buckets replicated."""
        return self.data_sharding == "optimizer"

    @property
    def fully_sharded(self) -> bool:
        """FSDP2 in effect: parameters, gradients and optimizer state sharded over the data shards."""
        return self.data_sharding == "full"

    @property
    def data_shards(self) -> int:
        """Ranks one parameter is sharded over under full sharding (the data degree without HSDP)."""
        return self.dp // self.data_replicas

    def data_coords(self, rank: int) -> tuple[int, int]:
        """(replica, shard rank) of a global rank: its data rank is replica * data_shards + shard rank."""
        dp_rank = self.coords(rank)[1]
        return dp_rank // self.data_shards, dp_rank % self.data_shards

    def dp_shard_groups(self) -> list[list[int]]:
        """The ranks that shard one copy of the parameters (full sharding): a slice of a data group."""
        s = self.data_shards
        return [g[r * s : (r + 1) * s] for g in self.dp_groups() for r in range(self.data_replicas)]

    def dp_replicate_groups(self) -> list[list[int]]:
        """The ranks holding the same shard in different replicas (HSDP): they all-reduce it."""
        s = self.data_shards
        return [g[k::s] for g in self.dp_groups() for k in range(s)]

    @property
    def virtual_stages(self) -> int:
        return max(1, len(self.stage_spans) // self.pp)

    @property
    def samples_per_rank(self) -> int:
        """Samples of one global batch that each data-parallel rank reads."""
        return self.global_batch_size // self.dp

    @property
    def num_microbatches(self) -> int:
        """Forward/backward passes per step on each rank (gradient accumulation steps)."""
        return self.samples_per_rank // self.micro_batch_size

    def describe(self) -> str:
        text = super().describe()
        if not self.fully_sharded:
            return text
        lines = [
            f"  data sharding: full (FSDP2) over {self.data_shards} ranks x {self.data_replicas} replicas"
        ]
        if self.data_replicas > 1:
            for title, groups in (
                ("data-shard", self.dp_shard_groups()),
                ("data-replicate", self.dp_replicate_groups()),
            ):
                lines.append(f"  {title + ' groups:':24s}{' '.join(str(g) for g in groups)}")
        return "\n".join([text, *lines])

    def spans_of(self, pp_rank: int) -> list[tuple[int, range]]:
        """(virtual stage, layer span) of each model chunk pipeline rank `pp_rank` holds, in chunk order."""
        return [
            (c * self.pp + pp_rank, self.stage_spans[c * self.pp + pp_rank])
            for c in range(self.virtual_stages)
        ]


# --------------------------------------------------------------------------------------------- rules
def check_world(tp: int, pp: int, data: int | None, world_size: int) -> int:
    """The data-parallel degree of tensor x pipeline x data = world size."""
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor={tp} x parallel.pipeline={pp}; "
            "launch a multiple of tensor x pipeline processes or change the degrees"
        )
    dp = data if data is not None else world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ConfigError(
            f"parallel.tensor={tp} x parallel.pipeline={pp} x parallel.data={dp} = {tp * pp * dp} "
            f"!= world size {world_size}; fix the degrees or leave parallel.data unset to derive it"
        )
    return dp


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


def check_sequence_parallel(sequence_parallel: bool, tp: int, seq_length: int | None) -> None:
    if not sequence_parallel:
        return
    if tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
    if seq_length is not None and seq_length % tp:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence over parallel.tensor={tp} ranks: "
            f"data.seq_length={seq_length} must be a multiple of {tp}"
        )


FP8_WIDTH_MULTIPLE = 16  # TE's FP8 GEMMs: both dimensions of every weight (shard) divisible by 16
FP8_TOKEN_MULTIPLE = 8  # ... and the tokens of a micro-batch (the GEMMs' other dimension) by 8


def _check_fp8_shapes(fp8: str, model: ModelConfig, tp: int) -> None:
    """Every block GEMM's weight shard (after the tensor split) has both dimensions divisible by 16.

    The shards: qkv (its rows) x hidden, hidden x o_proj (its columns), gate_up / up (rows) x hidden,
    hidden x down_proj (columns). The output head stays in BF16 and is not checked.
    """
    m, fix = FP8_WIDTH_MULTIPLE, "or set backend.fp8=none"
    if model.hidden_size % m:
        raise ConfigError(
            f"backend.fp8={fp8}: model.hidden_size={model.hidden_size} is not a multiple of {m} (every block "
            f"GEMM reads or writes the residual width; FP8 GEMMs need multiples of {m}); change it {fix}"
        )
    qkv = shard_qkv_layout(model, tp)
    if qkv.rows % m or qkv.q_rows % m:
        raise ConfigError(
            f"backend.fp8={fp8}: at parallel.tensor={tp} each rank's qkv projection has {qkv.rows} rows and "
            f"its o_proj {qkv.q_rows} columns (model.num_heads={model.num_heads}, model.num_kv_heads="
            f"{model.num_kv_heads}, head width {model.kv_channels}), not multiples of {m}; make "
            f"model.head_dim a multiple of {m} {fix}"
        )
    ffn = model.ffn_size // tp
    if ffn % m:
        raise ConfigError(
            f"backend.fp8={fp8}: model.ffn_hidden_size={model.ffn_size} over parallel.tensor={tp} gives each "
            f"rank {ffn} MLP columns, not a multiple of {m}; use a model.ffn_hidden_size divisible by "
            f"{m * tp} {fix}"
        )


def check_fp8(
    fp8: str, model: ModelConfig, tp: int, micro_batch_size: int, seq_length: int | None, recompute: str
) -> None:
    """What FP8 through Transformer Engine needs of the layout: GEMM shapes per shard, whole token
    blocks, and no full-block recomputation (its re-run forward would leave FP8 autocast)."""
    if fp8 == "none":
        return
    _check_fp8_shapes(fp8, model, tp)
    if seq_length is not None and (micro_batch_size * seq_length) % FP8_TOKEN_MULTIPLE:
        raise ConfigError(
            f"backend.fp8={fp8}: a micro-batch of train.micro_batch_size={micro_batch_size} x "
            f"data.seq_length={seq_length} tokens is not a multiple of {FP8_TOKEN_MULTIPLE} (the rows of "
            "every FP8 GEMM); "
            "change one of them or set backend.fp8=none"
        )
    if recompute == "full":
        raise ConfigError(
            f"backend.fp8={fp8} with parallel.recompute=full: the backward would re-run every block's TE "
            "GEMMs outside FP8 autocast, unlike its forward; use parallel.recompute=selective (it "
            "recomputes only the attention core, which has no TE GEMM) or none, or set backend.fp8=none"
        )


def split_layers(
    num_layers: int, pipeline: int, virtual_stages: int = 1, layers_per_stage: Sequence[int] | None = None
) -> list[range]:
    """The layer indices of each virtual stage, in stage order (stage s = chunk * pipeline + rank).

    Balanced by default; when the layers do not divide evenly the first stages take one more, since
    the last stage also runs the output head and the loss. `layers_per_stage` gives the counts
    explicitly: one per pipeline rank, or one per virtual stage when interleaving.
    """
    stages = pipeline * virtual_stages
    if layers_per_stage:
        counts = list(layers_per_stage)
        if len(counts) != stages:
            raise ConfigError(
                f"parallel.layers_per_stage has {len(counts)} entries but there are {stages} stages "
                f"(parallel.pipeline={pipeline} x parallel.virtual_stages={virtual_stages}); "
                "give one count per stage, in stage order"
            )
        if sum(counts) != num_layers or min(counts) < 1:
            raise ConfigError(
                f"parallel.layers_per_stage={counts} must be positive counts summing to "
                f"model.num_layers={num_layers}"
            )
    else:
        if num_layers < stages:
            raise ConfigError(
                f"model.num_layers={num_layers} cannot give each of the {stages} pipeline stages "
                f"(parallel.pipeline={pipeline} x parallel.virtual_stages={virtual_stages}) a layer"
            )
        base, extra = divmod(num_layers, stages)
        counts = [base + (s < extra) for s in range(stages)]
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


def check_batch(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per step on each rank: the global batch must split into whole micro-batches."""
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size="
            f"{micro_batch_size} x data-parallel degree {dp} = {per_step}"
        )
    return global_batch_size // per_step


def schedule_name(pipeline: int, virtual_stages: int, schedule: str) -> str:
    if pipeline == 1:
        return "none"
    return "interleaved" if virtual_stages > 1 else schedule


def check_schedule(pipeline: int, virtual_stages: int, schedule: str, num_microbatches: int) -> None:
    """The pipeline schedule's micro-batch rules: at least p of them, a multiple of p when interleaving."""
    p, v = pipeline, virtual_stages
    if v > 1 and schedule == "gpipe":
        raise ConfigError(
            "parallel.schedule=gpipe has no interleaved form: "
            "set parallel.schedule=1f1b or parallel.virtual_stages=1"
        )
    if v > 1 and p == 1:
        raise ConfigError(
            "parallel.virtual_stages > 1 interleaves pipeline stages: it needs parallel.pipeline > 1"
        )
    if p > 1 and num_microbatches < p:
        raise ConfigError(
            f"{num_microbatches} micro-batches per step (train.global_batch_size / (train.micro_batch_size x "
            f"data-parallel degree)) cannot fill parallel.pipeline={p} stages: raise train.global_batch_size "
            "or lower parallel.pipeline"
        )
    if v > 1 and num_microbatches % p:
        raise ConfigError(
            f"the interleaved schedule (parallel.virtual_stages={v}) sends micro-batches through the ring in "
            f"groups of parallel.pipeline={p}: {num_microbatches} micro-batches per step is not a multiple; "
            "change train.global_batch_size"
        )


def check_data_sharding(parallel: ParallelConfig, dp: int, fp8: str = "none") -> str:
    """The data sharding in effect ("none" when there is one data rank), or a ConfigError naming the fields.

    `full` shards each pipeline stage (each model chunk) on its own, over the data group of its
    pipeline rank, and runs under every schedule (GPipe, 1F1B, interleaved; tests/test_fully_sharded.py
    holds each equal to one process). `parallel.data_replicas` (HSDP) needs `full` and must split the
    data group into groups of at least two ranks. Transformer Engine's FP8 is refused with it (not
    built: FP8 modules keep per-weight scaling state that this path neither shards nor tests).
    """
    mode, replicas = parallel.sharding, parallel.data_replicas
    if replicas > 1 and mode != "full":
        raise ConfigError(
            f"parallel.data_replicas={replicas} (HSDP: shard within groups of data ranks, replicate across "
            f"them) needs parallel.data_sharding=full, not {mode}"
        )
    if replicas > 1 and (dp % replicas or dp // replicas < 2):
        raise ConfigError(
            f"parallel.data_replicas={replicas} must divide the data-parallel degree {dp} (parallel.data, or "
            "world size / (parallel.tensor x parallel.pipeline)) into groups of at least 2 ranks to shard "
            "over: choose a divisor of it, or parallel.data_replicas=1"
        )
    if mode != "full" or dp == 1:
        return mode if dp > 1 else "none"
    if fp8 != "none":
        raise ConfigError(
            f"backend.fp8={fp8} with parallel.data_sharding=full is not supported (full sharding is not "
            "built for Transformer Engine's FP8 weight state): set backend.fp8=none or "
            "parallel.data_sharding=optimizer"
        )
    return mode


# --------------------------------------------------------------------------------------------- composed
def validate_layout(
    parallel: ParallelConfig, model: ModelConfig, world_size: int, seq_length: int | None = None
) -> RankLayout:
    """The rank layout of `parallel` over `world_size` processes, checked against the model's shapes."""
    parallel.validate()
    tp, pp = parallel.tensor, parallel.pipeline
    dp = check_world(tp, pp, parallel.data, world_size)
    check_tensor_parallel(model, tp)
    if pp > model.num_layers:
        raise ConfigError(f"parallel.pipeline={pp} exceeds model.num_layers={model.num_layers}")
    check_sequence_parallel(parallel.sequence_parallel, tp, seq_length)
    return RankLayout(tp=tp, pp=pp, dp=dp)


def plan_layout(cfg: RunConfig, world_size: int) -> RunLayout:
    """Every layout rule for this run, with no process group; the one RunLayout the run hands down."""
    pc, tc = cfg.parallel, cfg.train
    ranks = validate_layout(pc, cfg.model, world_size, cfg.data.seq_length)
    spans = split_layers(cfg.model.num_layers, ranks.pp, pc.virtual_stages, pc.layers_per_stage)
    num_microbatches = check_batch(tc.global_batch_size, tc.micro_batch_size, ranks.dp)
    check_schedule(ranks.pp, pc.virtual_stages, pc.schedule, num_microbatches)
    check_fp8(cfg.backend.fp8, cfg.model, ranks.tp, tc.micro_batch_size, cfg.data.seq_length, pc.recompute)
    sharding = check_data_sharding(pc, ranks.dp, cfg.backend.fp8)
    return RunLayout(
        ranks.tp, ranks.pp, ranks.dp,
        sequence_parallel=pc.sequence_parallel,
        stage_spans=tuple(spans),
        schedule=schedule_name(ranks.pp, pc.virtual_stages, pc.schedule),
        micro_batch_size=tc.micro_batch_size,
        global_batch_size=tc.global_batch_size,
        data_sharding=sharding,
        data_replicas=pc.data_replicas if sharding == "full" else 1,
        reshard_after_forward=pc.reshard_after_forward,
    )  # fmt: skip
