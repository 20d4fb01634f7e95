"""The planner's estimates against measured tensors, its recommendations, and tools/plan_parallel.py.

Memory figures are checked against what a real model holds: parameter, gradient and AdamW state
bytes after one real optimizer step, per-rank parameters of a tensor-parallel model sharded by
parallel/ (on torch's fake process-group backend), and the activations autograd saves in a
forward pass (counted by storage with saved-tensor hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_andromeda.builder import build_model
from megatron_andromeda.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.models.presets import get_preset
from megatron_andromeda.parallel import (
    ParallelContext,
    RankLayout,
    parallelize_model,
    plan_layout,
    validate_layout,
)
from megatron_andromeda.parallel.hooks import build_parallel_training
from megatron_andromeda.parallel.mixed_precision import cast_parameters
from megatron_andromeda.planner import (
    GIB,
    Cluster,
    Layout,
    Precision,
    evaluate,
    fully_sharded_state,
    layer_activation_bytes,
    memory_estimate,
    recommend,
    stage_parameters,
)
from megatron_andromeda.training.optim import build_optimizer, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    vocab_size=160,
    hidden_size=56,
    num_layers=1,
    num_heads=4,
    head_dim=12,
    num_kv_heads=1,
    ffn_hidden_size=80,
    max_seq_length=64,
)
VARIANTS = {
    "palm-mqa": {},
    "mha": {"num_kv_heads": 4},
    "sequential-gelu-untied": {"block": "sequential", "activation": "gelu", "tie_embeddings": False},
    "no-z-loss": {"z_loss": 0.0},
}


def load_tool():
    spec = importlib.util.spec_from_file_location("plan_parallel", ROOT / "tools" / "plan_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------- model state
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_state_equals_a_real_step(variant):
    cfg = ModelConfig(**{**BASE, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = GPTModel(cfg)
    optimizer = build_optimizer(model, OptimConfig())
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    loss, _ = language_model_loss(model(x), x, z_loss=cfg.z_loss)
    loss.backward()
    optimizer.step()
    adam = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert len(adam) == 2 * len(list(model.parameters()))

    single = Precision.for_training("bf16", parallel=False)  # fp32 weights, torch AdamW, autocast
    est = memory_estimate(cfg, Layout(micro_batch_size=2), seq_length=16, global_batch=2, precision=single)
    assert est.weights == tensor_bytes(model.parameters())
    assert est.gradients == tensor_bytes(p.grad for p in model.parameters())
    assert est.optimizer == tensor_bytes(adam)


@pytest.mark.parametrize(("dp", "sharded"), [(1, False), (4, False), (4, True)])
def test_model_state_equals_the_parallel_optimizer(dp, sharded):
    """bf16 weights, fp32 main-gradient buffer, fp32 masters and AdamW moments (ZeRO-1 shards the
    last two); the buffer pads each bucket to a multiple of 64 x dp elements."""
    cfg = ModelConfig(**BASE)
    run = RunConfig(
        model=cfg,
        parallel=ParallelConfig(data=dp, distributed_optimizer=sharded),
        train=TrainConfig(precision="bf16", micro_batch_size=1, global_batch_size=dp),
    )
    dist.init_process_group("fake", store=_fake_store(), rank=0, world_size=dp)
    try:
        ctx = ParallelContext.build(plan_layout(run, dp))
        model = build_model(run, ctx)  # bf16 parameters
        training = build_parallel_training(ctx, model, run, parameter_groups(model, run.optim))
        training.optimizer.step()  # AdamW creates its moments
        held = training.optimizer.state_bytes()
        layout = Layout(data=dp, distributed_optimizer=sharded)
        est = memory_estimate(
            cfg, layout, seq_length=16, global_batch=dp, precision=Precision.for_training("bf16")
        )
        padding = 64 * dp * len(training.grad_buffer.layout.buckets)  # elements, at most
        assert est.weights == tensor_bytes(model.parameters())
        assert 0 <= training.grad_buffer.data.nbytes - est.gradients < 4 * padding
        assert abs(sum(held.values()) - est.optimizer) < 12 * padding
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_rank_parameters_equal_the_sharded_model(tp):
    cfg = ModelConfig(**{**BASE, "num_layers": 2, "hidden_size": 64, "head_dim": 16, "ffn_hidden_size": 96})
    dist.init_process_group("fake", store=_fake_store(), rank=tp - 1, world_size=tp)
    try:
        ctx = ParallelContext.build(RankLayout(tp, 1, 1))
        model = parallelize_model(GPTModel(cfg), ctx, ParallelConfig(tensor=tp))
        assert stage_parameters(cfg, Layout(tensor=tp)) == sum(p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_pipeline_stage_parameters_equal_the_stage_models():
    cfg = ModelConfig(**{**BASE, "num_layers": 4})
    first = GPTModel(cfg, layer_ids=range(2), post_process=False)
    last = GPTModel(cfg, layer_ids=range(2, 4), pre_process=False)  # holds its own copy of the tied head
    counts = [sum(p.numel() for p in m.parameters()) for m in (first, last)]
    assert stage_parameters(cfg, Layout(pipeline=2)) == max(counts)


def _fake_store():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


# --------------------------------------------------------------------------------------------- activations
def saved_activation_bytes(
    model: GPTModel, x: torch.Tensor, labels: torch.Tensor, autocast: bool, device_type: str = "cpu"
) -> int:
    """Bytes of the distinct storages autograd saves for backward (weights and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 0:  # the loss's scalar denominators are not activations
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    context = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with context:
            logits = model(x)
        language_model_loss(logits, labels, z_loss=model.cfg.z_loss)
    return sum(n for ptr, n in seen.items() if ptr not in own)


SCHEMES = {  # (weights cast to bf16, autocast, the planner's precision on CPU)
    "fp32": (False, False, Precision.for_training("fp32")),
    "bf16-single-process": (False, True, Precision.for_training("bf16", parallel=False)),
    # CPU autocast keeps LayerNorm in bf16; CUDA's runs it in fp32 (test_gpu_activations below).
    "bf16-parallel": (True, True, dataclasses.replace(Precision.for_training("bf16"), fp32_norms=False)),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_activations_equal_saved_tensors(variant, scheme):
    cast, autocast, precision = SCHEMES[scheme]
    cfg = ModelConfig(**{**BASE, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = GPTModel(cfg)
    if cast:
        cast_parameters(model, torch.bfloat16)
    x, labels = torch.randint(0, cfg.vocab_size, (2, 2, 32))
    measured = saved_activation_bytes(model, x, labels, autocast=autocast)
    layout = Layout(micro_batch_size=2)
    est = memory_estimate(cfg, layout, seq_length=32, global_batch=2, precision=precision)
    assert est.activations == measured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_activations_equal_saved_tensors():
    """The parallel trainer's bf16 scheme as CUDA runs it (LayerNorm in fp32, SDPA's fused kernels)."""
    cfg = ModelConfig(**{**BASE, "hidden_size": 256, "head_dim": 64, "ffn_hidden_size": 512})
    torch.manual_seed(0)
    model = cast_parameters(GPTModel(cfg).cuda(), torch.bfloat16)
    x, labels = torch.randint(0, cfg.vocab_size, (2, 2, 64), device="cuda")
    measured = saved_activation_bytes(model, x, labels, autocast=True, device_type="cuda")
    est = memory_estimate(cfg, Layout(micro_batch_size=2), seq_length=64, global_batch=2)
    assert abs(est.activations - measured) <= 0.01 * measured, (est.activations, measured)


def test_recomputation_and_sequence_parallel_shrink_activations():
    cfg, precision = get_preset("andromeda-1b"), Precision()
    sizes = {
        r: layer_activation_bytes(cfg, 2048, 4, Layout(micro_batch_size=4, recompute=r), precision)
        for r in ("none", "selective", "full")
    }
    assert sizes["full"] < sizes["selective"] < sizes["none"]
    assert sizes["full"] == 2048 * 4 * cfg.hidden_size * precision.weights  # the layer input only
    tp = Layout(tensor=2, micro_batch_size=4)
    sp = Layout(tensor=2, micro_batch_size=4, sequence_parallel=True)
    assert layer_activation_bytes(cfg, 2048, 4, sp, precision) < layer_activation_bytes(
        cfg, 2048, 4, tp, precision
    )


def test_pipeline_first_stage_holds_pp_micro_batches():
    cfg = get_preset("andromeda-1b")
    one = memory_estimate(
        cfg, Layout(pipeline=2, data=4, micro_batch_size=1), seq_length=2048, global_batch=64
    )
    two = memory_estimate(
        cfg, Layout(pipeline=4, data=2, micro_batch_size=1), seq_length=2048, global_batch=64
    )
    # 1F1B: pp micro-batches of L/pp layers each, so about the same activations at any depth.
    assert abs(one.activations - two.activations) / one.activations < 0.05


# --------------------------------------------------------------------------------------------- search
def test_recommendations_are_valid_and_sorted():
    cfg, cluster = get_preset("andromeda-1b"), Cluster(nodes=2)
    plans = recommend(cfg, cluster, seq_length=2048, global_batch=1024, top=5)
    assert [p.time.total for p in plans] == sorted(p.time.total for p in plans)
    for plan in plans:
        lay = plan.layout
        assert plan.fits and lay.world_size == 16 and 1024 % (lay.micro_batch_size * lay.data) == 0
        parallel = ParallelConfig(
            tensor=lay.tensor, pipeline=lay.pipeline, data=lay.data, sequence_parallel=lay.sequence_parallel
        )
        validate_layout(parallel, cfg, 16, 2048)


def test_small_gpus_need_full_sharding_or_model_parallelism():
    cfg, small = get_preset("andromeda-1b"), Cluster(memory_gib=12, peak_tflops=125)
    common = dict(seq_length=2048, global_batch=1024)
    zero1 = evaluate(cfg, Layout(data=8, micro_batch_size=1, distributed_optimizer=True), small, **common)
    assert not zero1.fits and zero1.memory.total > 12 * GIB * small.usable_fraction
    full = evaluate(cfg, Layout(data=8, micro_batch_size=1, full_sharding=True), small, **common)
    assert full.fits  # FSDP2 also shards the bf16 weights and the fp32 gradients
    best = recommend(cfg, small, top=1, **common)[0]
    assert best.layout.sharding == "full" and best.layout.tensor * best.layout.pipeline == 1
    tiny = Cluster(memory_gib=6, peak_tflops=125)  # the activations of one sequence no longer fit
    best = recommend(cfg, tiny, top=1, **common)[0]
    assert best.layout.tensor * best.layout.pipeline > 1
    with pytest.raises(ConfigError, match="no layout of 8 GPUs x 2 GiB fits"):
        recommend(cfg, Cluster(memory_gib=2), **common)


def test_mpt_7b_on_one_node_of_80_gb_trains_with_full_sharding_and_no_model_parallelism():
    cfg, node = get_preset("mpt-7b"), Cluster(nodes=1)
    common = dict(seq_length=2048, global_batch=1024)
    best = recommend(cfg, node, top=1, **common)[0]
    assert best.layout.sharding == "full" and best.layout.tensor == best.layout.pipeline == 1
    zero1 = evaluate(
        cfg, dataclasses.replace(best.layout, full_sharding=False, distributed_optimizer=True), node, **common
    )
    assert not zero1.fits  # the same micro-batch under ZeRO-1: bf16 weights and fp32 gradients replicated
    per_gpu = best.memory.weights + best.memory.gradients + best.memory.optimizer
    assert per_gpu < 16 * 6.7e9 / 8 * 1.25  # ~16 bytes per parameter / 8, plus the gathered units
    hsdp = recommend(cfg, Cluster(nodes=2), top=1, **common)[0].layout
    assert hsdp.sharding == "full" and hsdp.data_replicas == 2  # shard within a node, replicate across


@pytest.mark.parametrize(("dp", "rank", "precision"), [(4, 0, "bf16"), (4, 3, "fp32"), (3, 2, "bf16")])
def test_full_sharding_state_equals_the_sharded_model(dp, rank, precision):
    """fp32 shards of the weights, gradients and both Adam moments, plus the units FSDP2 gathers."""
    cfg = ModelConfig(**{**BASE, "num_layers": 3})
    run = RunConfig(
        model=cfg,
        parallel=ParallelConfig(data=dp, data_sharding="full"),
        train=TrainConfig(precision=precision, micro_batch_size=1, global_batch_size=dp),
    )
    dist.init_process_group("fake", store=_fake_store(), rank=rank, world_size=dp)
    try:
        ctx = ParallelContext.build(plan_layout(run, dp))
        model = build_model(run, ctx)
        training = build_parallel_training(ctx, model, run, parameter_groups(model, run.optim))
        training.optimizer.link_gradients()  # zero gradients: AdamW creates its moments
        training.optimizer.step()
        held = sum(f.stop - f.start for f in training.optimizer.fragments)  # this rank's elements
        rows = sum(p.numel() // p.shape[0] for p in model.parameters())  # one row of each parameter
        layout = Layout(data=dp, full_sharding=True)
        precision_ = Precision.for_training(precision)
        weights, gradients, optimizer = fully_sharded_state(cfg, layout, precision_)
        block = sum(p.numel() for p in model.layers["0"].parameters())
        ends = sum(p.numel() for p in model.parameters()) - cfg.num_layers * block
        gathered = (ends + 2 * block) * precision_.weights
        state = training.optimizer.state_bytes()
        assert state["master"] == 0  # the fp32 shards are the masters
        shard = optimizer // 8  # the estimate's elements per rank
        assert abs(state["exp_avg"] + state["exp_avg_sq"] - optimizer) <= 8 * rows
        assert abs(held - shard) <= rows  # chunks of whole rows: at most one row more or less each
        assert weights - gathered == 4 * shard
        assert gradients - 4 * shard == max(ends, block) * (precision_.weights + 4)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- the tool
def test_dry_run_of_64_ranks_builds_every_group():
    tool = load_tool()
    layout = Layout(tensor=2, pipeline=4, data=8, micro_batch_size=4, sequence_parallel=True)
    groups = tool.dry_run(layout, get_preset("andromeda-1b"), 2048)
    assert groups == {
        "tp_group": (32, 2),
        "dp_group": (8, 8),
        "pp_group": (16, 4),
        "embedding_group": (16, 2),
        "mp_group": (8, 8),
        "stage_group": (4, 16),
    }
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="num_heads=16 is not divisible by parallel.tensor=3"):
        tool.dry_run(Layout(tensor=3, pipeline=1, data=1), get_preset("andromeda-1b"), 2048)


def test_dry_run_of_hsdp_builds_shard_and_replica_groups_and_the_mesh():
    tool = load_tool()
    layout = Layout(tensor=2, pipeline=2, data=8, full_sharding=True, data_replicas=2)
    groups = tool.dry_run(layout, get_preset("andromeda-1b"), 2048)
    assert groups["dp_shard_group"] == (8, 4) and groups["dp_replicate_group"] == (16, 2)
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="parallel.data_replicas=3"):
        tool.dry_run(dataclasses.replace(layout, data_replicas=3), get_preset("andromeda-1b"), 2048)


def test_cli_search_json_and_overrides(tmp_path, capsys):
    tool = load_tool()
    out = tmp_path / "plans.json"
    config = str(ROOT / "examples" / "configs" / "andromeda_500m.yaml")
    assert tool.main(["--config", config, "--nodes", "2", "--top", "3", "--json", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: 16 ranks, every group built and checked" in text
    assert len(__import__("json").loads(out.read_text())) == 3

    assert tool.main(["--config", config, "--nodes", "2", "--print-overrides"]) == 0
    overrides = capsys.readouterr().out.split()
    run = load_config(config, overrides)  # the printed overrides are valid config keys
    validate_layout(run.parallel, run.model, 16, run.data.seq_length)


def test_cli_rejects_impossible_layouts(capsys):
    tool = load_tool()
    assert (
        tool.main(["--model", "andromeda-1b", "--nodes", "1", "--gpus-per-node", "3", "--layout", "3,1"]) == 2
    )
    assert "model.num_heads=16 is not divisible by parallel.tensor=3" in capsys.readouterr().err
    assert tool.main(["--model", "andromeda-1b", "--layout", "2,2,3"]) == 2
    assert "plan_parallel: error: --layout 2,2,3: 2 x 2 x 3 != 8 GPUs" in capsys.readouterr().err
