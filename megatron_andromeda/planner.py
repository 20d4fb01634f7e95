"""Per-GPU memory and step-time estimates for a parallel layout, and layout recommendations.

Memory per GPU is the model state of the most loaded rank (weights, gradients, AdamW states, the
latter sharded over the data group by the distributed optimizer, all three by full sharding: see
`fully_sharded_state`) plus the activations that rank keeps for its micro-batches in flight.
Activations follow the method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", section 4): list every tensor that autograd saves in one layer's forward
and add up their bytes. Applied to our block, the differences from their GPT layer
(34 s b h + 5 a s^2 b bytes) are:

- no s^2 term: SDPA's flash / memory-efficient kernels and flash-attn keep only a (b, heads, s)
  log-sum-exp, never the score matrix;
- no dropout masks (dropout is 0 in pretraining);
- PaLM's parallel block: one norm feeds attention and MLP, so its input is saved once;
- multi-query attention: SDPA (enable_gqa) and flash-attn read the KV heads in place, so the saved
  k is small, but v is a view of the qkv output and keeps all of it alive;
- SwiGLU: the (b, s, 2f) gate/up output, silu(gate) and the product are saved (4 s b f elements);
- mixed precision as the trainer runs it: fp32 weights, residual stream and norms, bf16 matmuls.
  Autocast keeps a bf16 copy of each weight per micro-batch in flight and a bf16 copy of each norm
  output per matmul that reads it.

tests/test_planner.py holds these figures equal to the bytes autograd saves on CPU, for LayerNorm
models; RMSNorm is counted as the fused kernel saves it (input and rstd), while PyTorch's composite
CPU implementation also keeps the normalised input.

With tensor parallelism t, head- and ffn-split tensors are divided by t; the norm region is
replicated unless sequence parallelism splits it along the sequence (column-parallel layers then
save their all-gathered input, as parallel/tensor_parallel.py does). Recomputation: "full" keeps
only each layer's input; "selective" recomputes the attention core and keeps its inputs.

Step time is a roofline sum: matmul FLOPs at a fraction of peak plus a fixed launch cost per layer
and micro-batch, ring all-reduce volumes over the link each group spans (tensor groups within a
node), the pipeline bubble, and what the data-parallel gradient reduction cannot hide behind the
last micro-batch's backward (parallel/data_parallel.py reduces buckets as they fill), plus the
distributed optimizer's all-gather of the updated weights; under full sharding, what FSDP2's
per-micro-batch gathers and reduce-scatters add beyond the compute they overlap with. It ranks
layouts; it does not replace a measurement (benchmarks/gpu_throughput.py gives the efficiency to
feed back in).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

from megatron_andromeda.config import ConfigError, ModelConfig, ParallelConfig
from megatron_andromeda.models.accounting import training_flops_per_token
from megatron_andromeda.parallel.layout import (
    check_batch,
    check_data_sharding,
    check_schedule,
    check_sequence_parallel,
    check_tensor_parallel,
    split_layers,
)

GIB = 2**30
# Dense bf16 peak TFLOP/s and memory (GiB) per GPU.
GPUS = {"h100": (989.0, 80.0), "h200": (989.0, 141.0), "a100-80gb": (312.0, 80.0), "a100-40gb": (312.0, 40.0)}
# GB/s per GPU in one direction: NVLink within a node, the NIC rail across nodes.
LINKS = {
    "nvlink4": 450.0,
    "nvlink3": 300.0,
    "pcie5": 64.0,
    "pcie4": 32.0,
    "ib-ndr": 50.0,
    "ib-hdr": 25.0,
    "eth-100g": 12.5,
}
RECOMPUTE = ("none", "selective", "full")
SHARDINGS = ("none", "optimizer", "full")  # parallel.data_sharding
# Eager PyTorch launches ~25 kernels per layer forward and ~50 backward, a few microseconds each:
# a fixed cost per layer and micro-batch that makes tiny pipeline stages and micro-batches slow.
LAYER_OVERHEAD_S = 2e-4
# Full sharding adds FSDP2's hooks (before and after each unit's forward and backward: buffer copies,
# casts, collective launches) per layer and micro-batch; an estimate of the same kind as the above.
FSDP_UNIT_OVERHEAD_S = 1e-4


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    peak_tflops: float = 989.0
    intra_gbs: float = LINKS["nvlink4"]
    inter_gbs: float = LINKS["ib-ndr"]
    usable_fraction: float = 0.9  # the rest: CUDA context, allocator fragmentation, NCCL buffers

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"
    virtual_stages: int = 1
    full_sharding: bool = False  # FSDP2: parameters, gradients and optimizer state sharded (data > 1)
    data_replicas: int = 1  # full sharding: HSDP replicas (shard within data / data_replicas ranks)

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def sharding(self) -> str:
        """parallel.data_sharding: none, optimizer (ZeRO-1) or full (FSDP2)."""
        return "full" if self.full_sharding else "optimizer" if self.distributed_optimizer else "none"

    @property
    def data_shards(self) -> int:
        return self.data // self.data_replicas

    def overrides(self) -> list[str]:
        """The command-line overrides that select this layout."""
        return [
            f"parallel.tensor={self.tensor}",
            f"parallel.pipeline={self.pipeline}",
            f"parallel.data={self.data}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            "parallel.distributed_optimizer=false",  # (its old alias, which a config file may set)
            f"parallel.data_sharding={self.sharding}",
            *([f"parallel.data_replicas={self.data_replicas}"] if self.data_replicas > 1 else []),
            f"parallel.recompute={self.recompute}",
            f"train.micro_batch_size={self.micro_batch_size}",
        ]


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor, and whether the forward runs under autocast."""

    weights: int = 2
    gradients: int = 4  # fp32 main gradients
    master: int = 4  # fp32 master copy of half-precision weights (0: the weights are the masters)
    optimizer: int = 8  # AdamW exp_avg + exp_avg_sq, fp32
    compute: int = 2  # matmul inputs and outputs
    autocast: bool = True
    fp32_norms: bool = True  # CUDA's autocast runs LayerNorm in fp32 (CPU's keeps the input dtype)

    @classmethod
    def for_training(cls, precision: str, parallel: bool = True) -> Precision:
        """What `train.precision` costs in the parallel trainer (parallel/mixed_precision.py: weights
        in the run's precision, fp32 main gradients and masters), or with `parallel=False` in the
        single-process one (fp32 weights, torch AdamW); both run the forward under autocast."""
        if precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {precision!r} is not one of fp32, bf16, fp16")
        half = precision != "fp32"
        if parallel:
            return cls(
                weights=2 if half else 4, master=4 if half else 0, compute=2 if half else 4, autocast=half
            )
        return cls(weights=4, master=0, compute=2 if half else 4, autocast=half)

    @property
    def norm(self) -> int:
        """Bytes of a norm's saved input and statistics: fp32 under CUDA autocast, else the residual's."""
        return 4 if (self.autocast and self.fp32_norms) else self.weights

    @property
    def weight_casts(self) -> bool:
        """Autocast keeps a compute-dtype copy of every matmul weight (per micro-batch in flight)."""
        return self.autocast and self.weights != self.compute


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU."""

    weights: int
    gradients: int
    optimizer: int  # AdamW states plus master weights, after distributed-optimizer sharding
    activations: int  # saved for backward, all micro-batches in flight (weight casts included)
    transient: int  # peak extra while one micro-batch runs: logits and loss, a recomputed layer

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    def as_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in {**asdict(self), "total": self.total}.items()}


# --------------------------------------------------------------------------------------------- parameters
def _kv_heads(cfg: ModelConfig, tp: int) -> int:
    return max(cfg.num_kv_heads // tp, 1)  # KV heads are split, or replicated when fewer than tp


def layer_matrix_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Weights of one layer's matrices on one tensor rank."""
    d, hd, heads = cfg.hidden_size, cfg.kv_channels, cfg.num_heads // tp
    attn = d * (heads + 2 * _kv_heads(cfg, tp)) * hd + heads * hd * d
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * (cfg.ffn_size // tp)
    return attn + mlp


def layer_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Weights of one layer (matrices and norms) on one tensor rank: one FSDP2 unit."""
    norms = cfg.hidden_size if cfg.block == "parallel" else 2 * cfg.hidden_size
    return layer_matrix_parameters(cfg, tp) + norms


def stage_parameters(cfg: ModelConfig, layout: Layout) -> int:
    """Parameters on the most loaded rank: the first or the last pipeline stage."""
    tp, pp = layout.tensor, layout.pipeline
    d, vocab = cfg.hidden_size, cfg.vocab_size // tp
    layers = math.ceil(cfg.num_layers / pp) * layer_parameters(cfg, tp)
    embedding = vocab * d
    # A tied head needs its own copy of the embedding when the last stage is another process.
    head = 0 if (cfg.tie_embeddings and pp == 1) else vocab * d
    first = embedding + layers + (d + head if pp == 1 else 0)
    last = layers + d + head
    return max(first, last)


# --------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(
    cfg: ModelConfig, seq: int, batch: int, layout: Layout, precision: Precision
) -> int:
    """Bytes one layer saves for backward for one micro-batch on one rank (see the module docstring)."""
    if layout.recompute == "full":  # the block's input: the residual stream, in the weights' dtype
        split = layout.tensor if layout.sequence_parallel else 1
        return seq * batch // split * cfg.hidden_size * precision.weights
    t, e, sp = layout.tensor, precision.compute, layout.sequence_parallel
    tokens, hd = seq * batch, cfg.kv_channels
    heads, kv = cfg.num_heads // t, _kv_heads(cfg, t)
    norm_in, norm_stats = _norm_input_bytes(cfg, seq, batch, layout, precision)
    norms = 1 if cfg.block == "parallel" else 2
    consumers = 2 if cfg.block == "parallel" else 1  # matmuls reading each norm's output
    shared = precision.norm == e and not sp  # one saved norm output, else one copy per matmul
    norm_out = norms * (1 if shared else consumers) * tokens * cfg.hidden_size * e
    # Attention saves the rotated q and k, the qkv output (v is a view of it), the core's output
    # (o_proj's input is a view of it: the kernels write (B, T, H, hd)) and its log-sum-exp. The KV
    # heads are shared in place (SDPA's enable_gqa, flash-attn), not repeated per query head.
    q = tokens * heads * hd * e
    k = tokens * kv * hd * e
    qkv_out = tokens * (heads + 2 * kv) * hd * e
    lse = 0 if layout.recompute == "selective" else batch * heads * seq * 4  # selective: recomputed
    rotary_tables = 4 * seq * (hd // 2) * e if cfg.position_embedding == "rotary" else 0  # cos/sin per q, k
    attn = q + k + qkv_out + q + lse + rotary_tables
    mlp = tokens * (cfg.ffn_size // t) * e * (4 if cfg.activation == "swiglu" else 2)
    casts = layer_matrix_parameters(cfg, t) * e if precision.weight_casts else 0
    return norms * (norm_in + norm_stats) + norm_out + attn + mlp + casts


def _norm_input_bytes(
    cfg: ModelConfig, seq: int, batch: int, layout: Layout, precision: Precision
) -> tuple[int, int]:
    """(the norm's saved input, its saved statistics), sequence-split under sequence parallelism."""
    split = layout.tensor if layout.sequence_parallel else 1
    tokens = seq * batch // split
    stats = (2 if cfg.norm == "layernorm" else 1) * tokens * precision.norm  # mean and rstd (RMS: rstd)
    return tokens * cfg.hidden_size * precision.norm, stats


def head_activation_bytes(
    cfg: ModelConfig, seq: int, batch: int, layout: Layout, precision: Precision
) -> tuple[int, int]:
    """(saved, transient) bytes of the final norm, output head and loss for one micro-batch.

    The loss runs in fp32 on a (b*s, V) copy of the logits: cross-entropy keeps its log-softmax, the
    z-loss its fp32 input; the bf16 logits live only until the loss is computed.
    """
    tokens, vocab = seq * batch, cfg.vocab_size // layout.tensor
    norm_in, norm_stats = _norm_input_bytes(cfg, seq, batch, layout, precision)
    norm_out = tokens * cfg.hidden_size * precision.compute
    fp32_copies = 2 if cfg.z_loss > 0 else 1
    loss = tokens * vocab * 4 * fp32_copies + tokens * (8 + 4 * fp32_copies)  # + labels, lse, per-token loss
    casts = vocab * cfg.hidden_size * precision.compute if precision.weight_casts else 0
    # The half-precision logits live until the loss has made its fp32 copy.
    transient = tokens * vocab * precision.compute if precision.compute != 4 else 0
    return norm_in + norm_stats + norm_out + loss + casts, transient


def micro_batches_in_flight(layout: Layout, num_micro_batches: int, schedule: str = "1f1b") -> float:
    """Micro-batches whose activations the first pipeline stage holds at once (Korthikanti et al.:
    p for 1F1B, times 1 + (p - 1) / (p v) for the interleaved schedule, all of them for GPipe)."""
    pp, v = layout.pipeline, layout.virtual_stages
    if schedule == "gpipe":
        return num_micro_batches
    in_flight = min(pp, num_micro_batches)
    return in_flight * (1 + (pp - 1) / (pp * v)) if v > 1 else in_flight


# --------------------------------------------------------------------------------------------- memory
def memory_estimate(
    cfg: ModelConfig,
    layout: Layout,
    *,
    seq_length: int,
    global_batch: int,
    precision: Precision | None = None,
    schedule: str = "1f1b",
) -> MemoryEstimate:
    precision = precision or Precision()
    params = stage_parameters(cfg, layout)
    shard = layout.data if layout.distributed_optimizer else 1
    optimizer = math.ceil(params / shard) * (precision.optimizer + precision.master)
    weights, gradients = params * precision.weights, params * precision.gradients
    if layout.full_sharding:
        weights, gradients, optimizer = fully_sharded_state(cfg, layout, precision)
    b, s = layout.micro_batch_size, seq_length
    num_micro = global_batch // (layout.micro_batch_size * layout.data)
    layers = math.ceil(cfg.num_layers / layout.pipeline)
    per_micro = layers * layer_activation_bytes(cfg, s, b, layout, precision) + b * s * 8  # token ids
    activations = math.ceil(per_micro * micro_batches_in_flight(layout, num_micro, schedule))
    head_saved, head_transient = head_activation_bytes(cfg, s, b, layout, precision)
    transient = head_transient
    if layout.pipeline == 1:
        activations += head_saved
    else:  # 1F1B: the last stage holds one micro-batch of its layers plus the head; count the larger
        transient += max(0, per_micro + head_saved - activations)
    if layout.recompute == "full":  # one layer's activations are rebuilt at a time during backward
        transient += layer_activation_bytes(cfg, s, b, _no_recompute(layout), precision)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        transient=transient,
    )


FP32 = 4


def fully_sharded_state(cfg: ModelConfig, layout: Layout, precision: Precision) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes under full sharding (parallel/fully_sharded.py).

    Persistent: this rank's fp32 shard of every parameter (the master weight), of its gradient and
    of the two Adam moments, over data / data_replicas ranks. Gathered while a micro-batch runs, in
    the run's precision: the stage's own unit (embedding, final norm, head) for the whole forward and
    backward, and two blocks (the running one and the one FSDP2 prefetches); in the backward one
    unit's unsharded gradients, in the run's precision and as the fp32 reduce-scatter input.
    """
    params = stage_parameters(cfg, layout)
    shard = math.ceil(params / layout.data_shards)
    block = layer_parameters(cfg, layout.tensor)
    layers = math.ceil(cfg.num_layers / layout.pipeline)
    ends = params - layers * block
    gathered = ends + min(layers, 2) * block
    weights = shard * FP32 + gathered * precision.weights
    gradients = shard * precision.gradients + max(ends, block) * (precision.weights + FP32)
    return weights, gradients, shard * precision.optimizer


def _no_recompute(layout: Layout) -> Layout:
    return Layout(**{**asdict(layout), "recompute": "none"})


# --------------------------------------------------------------------------------------------- time
@dataclass(frozen=True)
class StepTime:
    compute: float
    tensor_comm: float
    pipeline_comm: float
    bubble: float
    data_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.tensor_comm + self.pipeline_comm + self.bubble + self.data_comm


def _ring_seconds(nbytes: float, ranks: int, gbs: float, all_reduce: bool = True) -> float:
    if ranks == 1:
        return 0.0
    factor = 2 * (ranks - 1) / ranks if all_reduce else (ranks - 1) / ranks
    return factor * nbytes / (gbs * 1e9)


def step_time(
    cfg: ModelConfig,
    layout: Layout,
    cluster: Cluster,
    *,
    seq_length: int,
    global_batch: int,
    precision: Precision | None = None,
    efficiency: float = 0.5,
    layer_overhead_s: float = LAYER_OVERHEAD_S,
) -> StepTime:
    """Seconds per optimizer step; `efficiency` is the achieved fraction of peak for the matmuls."""
    precision = precision or Precision()
    t, pp, dp, b = layout.tensor, layout.pipeline, layout.data, layout.micro_batch_size
    tokens = global_batch * seq_length
    flops = training_flops_per_token(cfg, seq_length) * tokens / layout.world_size
    if layout.recompute == "full":
        flops *= 4 / 3  # one more forward pass
    elif layout.recompute == "selective":
        attention = 12 * cfg.num_layers * cfg.num_heads * cfg.kv_channels * seq_length
        flops += attention / 3 * tokens / layout.world_size
    num_micro = global_batch // (b * dp)
    layers = math.ceil(cfg.num_layers / pp)
    compute = flops / (cluster.peak_tflops * 1e12 * efficiency) + layers * num_micro * layer_overhead_s
    gpn = cluster.gpus_per_node
    intra, inter = cluster.intra_gbs, cluster.inter_gbs
    act = b * seq_length * cfg.hidden_size * precision.compute
    reduces = 4 + (2 if layout.recompute == "full" else 0)  # per layer: 2 forward, 2 backward
    tensor_comm = num_micro * (layers * reduces + 2) * _ring_seconds(act, t, intra)
    pp_link = intra if t * dp * pp <= gpn else inter
    stage_message = act / (t if layout.sequence_parallel else 1)  # SP: each rank sends its sequence chunk
    pipeline_comm = 0.0 if pp == 1 else num_micro * 2 * stage_message / (pp_link * 1e9)
    bubble = (pp - 1) / (layout.virtual_stages * num_micro) * (compute + tensor_comm)
    # A data group that spans nodes has gpn / t members per node; NCCL's rings use all their NICs.
    dp_link = intra if t * dp <= gpn else min(intra, inter * max(1, gpn // t))
    params = stage_parameters(cfg, layout)
    if layout.full_sharding:
        data_comm = _fully_sharded_seconds(cfg, layout, cluster, precision, params, compute / num_micro)
        return StepTime(compute, tensor_comm, pipeline_comm, bubble, num_micro * data_comm)
    if layout.distributed_optimizer:  # reduce-scatter the gradients, all-gather the updated weights
        reduce = _ring_seconds(params * precision.gradients, dp, dp_link, all_reduce=False)
        gather = _ring_seconds(params * precision.weights, dp, dp_link, all_reduce=False)
    else:
        reduce, gather = _ring_seconds(params * precision.gradients, dp, dp_link), 0.0
    # Buckets are reduced while the last micro-batch's backward (2/3 of its compute) still runs.
    data_comm = max(0.0, reduce - 2 / 3 * compute / num_micro) + gather
    return StepTime(compute, tensor_comm, pipeline_comm, bubble, data_comm)


def _fully_sharded_seconds(
    cfg: ModelConfig, layout: Layout, cluster: Cluster, precision: Precision, params: int, compute: float
) -> float:
    """Exposed data-parallel seconds of one micro-batch under full sharding (FSDP2).

    Every micro-batch gathers the weights for the forward and again for the backward (they are
    resharded after the forward) and reduce-scatters the gradients in fp32; with HSDP the shards are
    then all-reduced across the replicas. FSDP2 prefetches the next unit while one computes, so only
    what exceeds the micro-batch's compute shows, plus the first unit's gather and the hooks' cost.
    """
    t, gpn, shards = layout.tensor, cluster.gpus_per_node, layout.data_shards
    link = (
        cluster.intra_gbs
        if t * shards <= gpn
        else min(cluster.intra_gbs, cluster.inter_gbs * max(1, gpn // t))
    )
    gather = _ring_seconds(params * precision.weights, shards, link, all_reduce=False)
    scatter = _ring_seconds(params * FP32, shards, link, all_reduce=False)
    across = cluster.inter_gbs if layout.world_size > gpn else cluster.intra_gbs
    replicate = _ring_seconds(math.ceil(params / shards) * FP32, layout.data_replicas, across)
    traffic = 2 * gather + scatter + replicate
    layers = math.ceil(cfg.num_layers / layout.pipeline)
    return max(0.0, traffic - compute) + gather / layers + layers * FSDP_UNIT_OVERHEAD_S


# --------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    fits: bool


def layout_problem(cfg: ModelConfig, layout: Layout, global_batch: int, seq_length: int) -> str | None:
    """Why a layout cannot run this model (None if it can): the very rules of parallel/layout.py."""
    try:
        check_tensor_parallel(cfg, layout.tensor)
        split_layers(cfg.num_layers, layout.pipeline, layout.virtual_stages)
        micro_batches = check_batch(global_batch, layout.micro_batch_size, layout.data)
        check_schedule(layout.pipeline, layout.virtual_stages, "1f1b", micro_batches)
        check_sequence_parallel(layout.sequence_parallel, layout.tensor, seq_length)
        sharding = ParallelConfig(data_sharding=layout.sharding, data_replicas=layout.data_replicas)
        check_data_sharding(sharding, layout.data)
    except ConfigError as err:
        return str(err)
    return None


def candidate_layouts(cfg: ModelConfig, cluster: Cluster, global_batch: int, seq_length: int) -> list[Layout]:
    """Every valid layout: tensor within a node, sequence parallel with tensor > 1, and with dp > 1 the
    data group sharding the optimizer (ZeRO-1) or everything (full; HSDP with one replica per node
    when the data group spans nodes)."""
    world, found = cluster.world_size, []
    tensors = [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node and world % t == 0]
    for t in tensors:
        for pp in (p for p in range(1, world // t + 1) if (world // t) % p == 0):
            dp = world // (t * pp)
            for mbs, recompute, sharding in itertools.product(
                (1, 2, 4, 8, 16, 32), RECOMPUTE, _shardings(dp, t, cluster.gpus_per_node)
            ):
                layout = Layout(t, pp, dp, mbs, t > 1, recompute=recompute, **sharding)
                if layout_problem(cfg, layout, global_batch, seq_length) is None:
                    found.append(layout)
    return found


def _shardings(dp: int, tensor: int, gpus_per_node: int) -> list[dict]:
    if dp == 1:
        return [{}]
    out = [{"distributed_optimizer": True}, {"full_sharding": True}]
    per_node = max(1, gpus_per_node // tensor)  # data ranks of one pipeline stage within a node
    if dp > per_node >= 2 and dp % per_node == 0:
        out.append({"full_sharding": True, "data_replicas": dp // per_node})
    return out


def evaluate(
    cfg: ModelConfig,
    layout: Layout,
    cluster: Cluster,
    *,
    seq_length: int,
    global_batch: int,
    precision: Precision | None = None,
    efficiency: float = 0.5,
) -> Plan:
    precision = precision or Precision()
    memory = memory_estimate(
        cfg, layout, seq_length=seq_length, global_batch=global_batch, precision=precision
    )
    time = step_time(
        cfg,
        layout,
        cluster,
        seq_length=seq_length,
        global_batch=global_batch,
        precision=precision,
        efficiency=efficiency,
    )
    tokens_per_gpu = global_batch * seq_length / time.total / layout.world_size
    mfu = tokens_per_gpu * training_flops_per_token(cfg, seq_length) / (cluster.peak_tflops * 1e12)
    fits = memory.total <= cluster.memory_gib * GIB * cluster.usable_fraction
    return Plan(layout, memory, time, tokens_per_gpu, mfu, fits)


def recommend(
    cfg: ModelConfig,
    cluster: Cluster,
    *,
    seq_length: int,
    global_batch: int,
    precision: Precision | None = None,
    efficiency: float = 0.5,
    top: int = 5,
) -> list[Plan]:
    """The fastest layouts that fit in memory, best first (ties: less model parallelism, less recompute)."""
    plans = [
        evaluate(
            cfg,
            layout,
            cluster,
            seq_length=seq_length,
            global_batch=global_batch,
            precision=precision,
            efficiency=efficiency,
        )
        for layout in candidate_layouts(cfg, cluster, global_batch, seq_length)
    ]
    fitting = [p for p in plans if p.fits]
    if not fitting:
        raise ConfigError(
            f"no layout of {cluster.world_size} GPUs x {cluster.memory_gib:g} GiB fits {cfg.name} at "
            f"sequence {seq_length}: add GPUs or lower the global batch"
        )

    # Ties (the time model has no micro-batch term): less model parallelism and recomputation, then
    # the larger micro-batch, whose bigger matmuls run closer to peak.
    def key(p: Plan) -> tuple:
        lay = p.layout
        return (
            round(p.time.total, 4),
            lay.tensor * lay.pipeline,
            RECOMPUTE.index(lay.recompute),
            SHARDINGS.index(lay.sharding),  # the same time: the one with less traffic
            -lay.micro_batch_size,
        )

    return sorted(fitting, key=key)[:top]


def format_plans(plans: list[Plan]) -> str:
    header = (
        f"{'tp':>3} {'pp':>3} {'dp':>4} {'mbs':>4} {'sp':>3} {'sharding':>8} {'recompute':>9} "
        f"{'mem GiB':>8} {'act GiB':>8} {'step s':>7} {'tok/s/GPU':>10} {'MFU':>6}"
    )
    rows = [header]
    for p in plans:
        lay = p.layout
        rows.append(
            f"{lay.tensor:>3} {lay.pipeline:>3} {lay.data:>4} {lay.micro_batch_size:>4} "
            f"{'y' if lay.sequence_parallel else 'n':>3} {_sharding_label(lay):>8} "
            f"{lay.recompute:>9} {p.memory.total / GIB:>8.1f} {p.memory.activations / GIB:>8.1f} "
            f"{p.time.total:>7.3f} {p.tokens_per_s_per_gpu:>10,.0f} {100 * p.mfu:>5.1f}%"
        )
    return "\n".join(rows)


def _sharding_label(layout: Layout) -> str:
    label = {"none": "-", "optimizer": "zero1", "full": "full"}[layout.sharding]
    return f"hsdp{layout.data_replicas}" if layout.data_replicas > 1 else label
