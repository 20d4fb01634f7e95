"""Transformer Engine at every tensor-parallel degree, checked on CPU with the fake library.

The fake (fake_kernels.install_fake_te) has TE's constructor signatures and forward semantics and
records every module built, every GEMM and every autocast, so these tests check the wiring:

- the fused LayerNormLinear equals the norm followed by the linear (values and gradients, fp32);
- through `train.build_training` on gloo, tensor 2 with and without sequence parallelism, every
  block GEMM runs through TE as a local GEMM (parallel_mode None) and training equals one plain
  process (fp32); the parameter names are the plain ones;
- FP8: every block GEMM runs under the autocast, whose amax group is this pipeline stage's tensor x
  data ranks (tensor 2, data 2, pipeline 2 each checked), and the shipped shapes plan at tensor
  1 / 2 / 4 / 8 with sequence parallelism; each refusal names the config field;
- checkpoints move between TE and plain runs and between layouts, both ways.

What only a GPU can check (the FP8 numerics, TE's kernels themselves, the real signatures) is in
the `gpu`-marked tests at the end, which skip here.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fake_kernels import install_fake_te
from hang_guard import HANG_GUARD_S
from torch import nn
from training_helpers import Tokens, context_for, product_trainer

from megatron_andromeda.builder import build_model
from megatron_andromeda.config import ConfigError, ModelConfig, RunConfig, load_config
from megatron_andromeda.kernels import (
    BackendChoice,
    BackendConfig,
    Environment,
    Library,
    apply_kernels,
    fp8_context,
    probe_environment,
    select_backends,
)
from megatron_andromeda.models import GPTModel
from megatron_andromeda.parallel import plan_layout
from megatron_andromeda.parallel.mappings import count_comm
from megatron_andromeda.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_andromeda.parallel.testing import run_distributed
from megatron_andromeda.te_layers import FusedNorm, swap_block_linears

VOCAB, SEQ, STEPS = 128, 16, 3
FUSED = BackendChoice(linear="te", fuse_norm=True)
GEMMS_PER_LAYER = 4  # qkv, o_proj, gate_up / up, down_proj


def run_config(root: Path | str, *extra: str) -> RunConfig:
    return load_config(None, [
        f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=1", "model.ffn_hidden_size=64", f"model.max_seq_length={SEQ}",
        f"data.seq_length={SEQ}", "train.device=cpu", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"train.steps={2 * STEPS}", "train.eval_interval=0", "optim.lr=1e-2", "optim.warmup_steps=1",
        "optim.clip_grad=0.5", f"logging.run_dir={root}/run", "logging.progress_bar=false",
        "logging.tensorboard=false", f"checkpoint.save_dir={root}/ckpt", *extra,
    ])  # fmt: skip


def losses(trainer, steps: int = STEPS) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(steps)]


def plain_names(cfg: RunConfig) -> list[str]:
    return [n for n, _ in GPTModel(cfg.model).named_parameters()]


def te_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__ == "fake_kernels"]


def block_gemm_calls(log: dict) -> list[dict]:
    return [c for c in log["calls"] if c["kind"] in ("Linear", "LayerNormLinear")]


# --------------------------------------------------------------------------------------------- one process
def model_pair(cfg: RunConfig) -> tuple[GPTModel, GPTModel]:
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    return model, copy.deepcopy(model)


def grads_by_name(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "extra",
    [(), ("model.block=sequential", "model.norm=rmsnorm"), ("model.activation=gelu",)],
    ids=["parallel-layernorm-swiglu", "sequential-rmsnorm", "gelu"],
)
def test_fused_norm_linear_equals_norm_then_linear(fake_te, tmp_path, extra):
    cfg = run_config(tmp_path, *extra)
    plain, fused = model_pair(cfg)
    apply_kernels(fused, FUSED)
    x = Tokens(VOCAB, SEQ).data[:2, :SEQ]
    expected_logits, expected = grads_by_name(plain, x)
    got_logits, got = grads_by_name(fused, x)
    assert list(got) == list(expected)  # the same names, in the same order
    torch.testing.assert_close(got_logits, expected_logits)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    for block in fused.layers.values():
        norms = [m for n, m in block.named_children() if n.startswith("norm")]
        assert norms and all(type(n) is FusedNorm for n in norms)
        # the fused modules normalise with the norm's own parameter (one object, one name)
        assert block.attn.qkv_proj.layer_norm_weight is norms[0].weight
        up = block.mlp.gate_up_proj if block.mlp.swiglu else block.mlp.up_proj
        assert up.layer_norm_weight is norms[-1].weight
    kinds = [c["kind"] for c in block_gemm_calls(fake_te)]
    assert kinds == ["LayerNormLinear", "Linear", "LayerNormLinear", "Linear"] * cfg.model.num_layers
    built = fake_te["modules"]
    want = "RMSNorm" if cfg.model.norm == "rmsnorm" else "LayerNorm"
    assert {m["normalization"] for m in built if m["kind"] == "LayerNormLinear"} == {want}
    assert {m["eps"] for m in built if m["kind"] == "LayerNormLinear"} == {cfg.model.norm_eps}


def test_state_dict_keeps_plain_keys_and_drops_fp8_metadata(fake_te, tmp_path):
    cfg = run_config(tmp_path)
    plain, fused = model_pair(cfg)
    apply_kernels(fused, BackendChoice(linear="te", fp8="delayed", fuse_norm=True))
    with fp8_context(BackendChoice(linear="te", fp8="delayed")):
        fused(Tokens(VOCAB, SEQ).data[:2, :SEQ])
    assert all(m.get_extra_state().numel() for m in te_modules(fused))  # TE would now save FP8 metadata
    state = fused.state_dict()
    assert list(state) == list(plain.state_dict())  # no alias, no _extra_state
    assert [n for n, _ in fused.named_parameters()] == plain_names(cfg)
    # a plain state dict loads strictly; FP8 metadata offered to the model is dropped unread
    torch.manual_seed(5)
    other = GPTModel(cfg.model).state_dict()
    offered = {**other, "layers.0.attn.qkv_proj._extra_state": torch.tensor([1, 2], dtype=torch.uint8)}
    fused.load_state_dict(offered)  # strict
    fused.load_state_dict(other)  # strict
    assert fake_te["set_extra_state"] == []
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"layers.0.norm.weight\""):
        fused.load_state_dict({k: v for k, v in other.items() if k != "layers.0.norm.weight"})
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param, other[name])
    assert fused.layers["0"].attn.qkv_proj.layer_norm_weight is fused.layers["0"].norm.weight


def test_only_local_gemms_are_swapped(fake_te):
    """A layer that does its own collective cannot become a (collective-free) TE module."""
    cfg = run_config("unused")
    block = GPTModel(cfg.model).layers["0"]
    block.attn.qkv_proj = ColumnParallelLinear(block.attn.qkv_proj.weight, None, input_mode="replicated")
    te = importlib.import_module("transformer_engine.pytorch")
    with pytest.raises(ValueError, match="attn.qkv_proj is a ColumnParallelLinear.*input_mode=replicated"):
        swap_block_linears(block, te, fuse_norm=True)


def test_te_trainer_at_tensor_1_equals_plain(fake_te, tmp_path):
    """One process through train.build_training: auto picks the (fake) TE on this CPU."""
    cfg = run_config(tmp_path / "te")
    trainer, parts = product_trainer(cfg, Tokens(VOCAB, SEQ), tmp_path / "te")
    assert (parts.kernels.linear, parts.kernels.fuse_norm) == ("te", True)
    assert len(te_modules(parts.model)) == GEMMS_PER_LAYER * cfg.model.num_layers
    got = losses(trainer)
    plain_cfg = run_config(tmp_path / "plain", "backend.linear=torch")
    reference, _ = product_trainer(plain_cfg, Tokens(VOCAB, SEQ), tmp_path / "plain")
    assert got == pytest.approx(losses(reference), rel=1e-6)


def test_te_is_selected_on_cpu_only_in_tests(monkeypatch):
    """Selection needs a kernel device: CUDA, plus the CPU while the fake is installed."""
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="backend.linear=te needs Transformer Engine on a CUDA device"):
        select_backends(
            BackendConfig(linear="te"), cpu, env=Environment(transformer_engine=Library("2.9", ""))
        )
    install_fake_te(monkeypatch)
    choice = select_backends(BackendConfig(fp8="delayed"), cpu)  # probes the fake
    assert (choice.linear, choice.fp8, choice.fuse_norm) == ("te", "delayed", True)


def test_gpu_throughput_te_rows_run_with_the_fake(fake_te, monkeypatch):
    """The GPU benchmark's TE rows (fused, unfused, both FP8 recipes) run their training steps on CPU."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
    spec = importlib.util.spec_from_file_location("gpu_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "gpu_throughput", bench)
    spec.loader.exec_module(bench)
    variants = ["bf16-sdpa", "bf16-te", "bf16-te-unfused", "fp8-delayed", "fp8-current"]
    rows = bench.main(["--smoke", "--variants", ",".join(variants)])
    assert [(r.variant, r.status) for r in rows] == [(v, "ok") for v in variants]
    assert "norms fused" in rows[1].backends and "norms fused" not in rows[2].backends
    kinds = {m["kind"] for m in fake_te["modules"]}
    assert kinds == {"Linear", "LayerNormLinear"}
    recipes = {type(e["recipe"]).__name__ for e in fake_te["autocast"] if "recipe" in e}
    assert recipes == {"DelayedScaling", "Float8CurrentScaling"}
    assert any(c["fp8"] for c in fake_te["calls"]) and not all(c["fp8"] for c in fake_te["calls"])


# --------------------------------------------------------------------------------------------- FP8 refusals
@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (("model.hidden_size=40", "model.num_heads=2", "model.head_dim=16"), 1,
         "backend.fp8=delayed: model.hidden_size=40 is not a multiple of 16"),
        # head width 8: 48 qkv rows at tensor 1, 32 at tensor 2, but 8 o_proj columns per rank at 4
        (("parallel.tensor=4",), 4, r"at parallel.tensor=4 each rank's qkv projection has 24 rows and its "
         r"o_proj 8 columns .*make model.head_dim a multiple of 16"),
        (("model.ffn_hidden_size=96", "parallel.tensor=4", "model.head_dim=16"), 4,
         "model.ffn_hidden_size=96 over parallel.tensor=4 gives each rank 24 MLP columns"),
        (("train.micro_batch_size=1", "train.global_batch_size=1", "data.seq_length=12"), 1,
         r"train.micro_batch_size=1 x data.seq_length=12 tokens is not a multiple of 8"),
        (("parallel.recompute=full",), 1, "backend.fp8=delayed with parallel.recompute=full"),
    ],
    ids=["hidden", "head-width-per-shard", "ffn-per-shard", "tokens", "full-recompute"],
)  # fmt: skip
def test_every_fp8_refusal_names_the_field(tmp_path, extra, world, message):
    """plan_layout refuses before any process group; the same layout without FP8 is fine."""
    cfg = run_config(tmp_path, *extra)
    plan_layout(cfg, world)
    cfg.backend.fp8 = "delayed"
    with pytest.raises(ConfigError, match=message):
        plan_layout(cfg, world)


def test_fp8_widths_are_checked_per_shard(tmp_path):
    """ffn 96 is 48 per rank at tensor 2 (fine) and 24 at tensor 4 (refused)."""
    for tensor, ok in ((1, True), (2, True), (4, False)):
        cfg = run_config(tmp_path, "backend.fp8=current", "model.ffn_hidden_size=96", "model.head_dim=16",
                         f"parallel.tensor={tensor}")  # fmt: skip
        if ok:
            plan_layout(cfg, tensor)
        else:
            with pytest.raises(ConfigError, match="model.ffn_hidden_size=96"):
                plan_layout(cfg, tensor)


@pytest.mark.parametrize("preset", ["andromeda-1b", "mpt-7b"])
@pytest.mark.parametrize("fp8", ["delayed", "current"])
def test_fp8_plans_at_tensor_1_2_4_8_with_sequence_parallelism(preset, fp8):
    """The shipped shapes pass FP8's per-shard rules at every tensor degree (no process group)."""
    for tensor in (1, 2, 4, 8):
        sp = str(tensor > 1).lower()
        cfg = load_config(None, [f"model={preset}", f"backend.fp8={fp8}", f"parallel.tensor={tensor}",
                                 f"parallel.sequence_parallel={sp}", "data.seq_length=2048",
                                 "train.micro_batch_size=1", "train.global_batch_size=8"])  # fmt: skip
        layout = plan_layout(cfg, tensor * 2)  # with data parallelism 2
        assert (layout.tp, layout.dp, layout.sequence_parallel) == (tensor, 2, tensor > 1)


# --------------------------------------------------------------------------------------------- 2 ranks
TP2 = ("parallel.tensor=2",)
TP2_SP = ("parallel.tensor=2", "parallel.sequence_parallel=true")
SEQUENTIAL = ("model.block=sequential", "model.norm=rmsnorm")
CASES = {  # name: config overrides; every case runs with the fake TE, fused norms
    "tp2": TP2,
    "tp2_sp": TP2_SP,
    "tp2_sequential": (*TP2, *SEQUENTIAL),
    "tp2_sp_sequential": (*TP2_SP, *SEQUENTIAL),
    "tp2_sp_fp8": (*TP2_SP, "backend.fp8=delayed"),
}


OUR_TP_LAYERS = (ColumnParallelLinear, RowParallelLinear)


def te_case(root: Path, extra: tuple[str, ...], log: dict) -> dict:
    cfg = run_config(root, *extra)
    ctx = context_for(cfg)
    for key in log:
        log[key].clear()
    trainer, parts = product_trainer(cfg, Tokens(VOCAB, SEQ), root, ctx=ctx)
    model = parts.model
    result = {
        "kernels": (parts.kernels.linear, parts.kernels.fp8, parts.kernels.fuse_norm),
        "names": [n for n, _ in model.named_parameters()],
        "our_tp_layers_left": sum(isinstance(m, OUR_TP_LAYERS) for m in model.modules()),
        "modules": [{k: v for k, v in m.items() if k != "device"} for m in log["modules"]],
        "losses": losses(trainer),
    }  # fmt: skip
    weights = {id(m.weight) for m in te_modules(model)}
    calls = block_gemm_calls(log)
    result["calls"] = [{k: v for k, v in c.items() if k != "weight"} for c in calls]
    result["calls_on_model_weights"] = all(id(c["weight"]) in weights for c in calls)
    result["autocast"] = [{**e, "recipe": type(e["recipe"]).__name__} for e in log["autocast"]]
    return result


def checkpoint_cases(root: Path, log: dict) -> dict:
    """TE at tensor 2 + SP loads the plain tensor-1 checkpoint, and saves one for the plain run."""
    out = {}
    cfg = run_config(root / "te_loads_plain", *TP2_SP)
    trainer, _ = product_trainer(cfg, Tokens(VOCAB, SEQ), root / "te_loads_plain", ctx=context_for(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random states are not restored across layouts
        assert trainer.resume(root / "plain" / "ckpt")
    out["after_plain_checkpoint"] = losses(trainer)
    cfg = run_config(root / "te", *TP2_SP)
    trainer, _ = product_trainer(cfg, Tokens(VOCAB, SEQ), root / "te", ctx=context_for(cfg))
    losses(trainer)
    trainer.save()
    trainer.checkpointer.wait()
    out["after_te_checkpoint"] = losses(trainer)
    return out


FP8_GROUP_CASES = {  # name: (overrides, the amax group of rank r, micro-batches per step on a rank)
    "pipeline2_fp8": (("parallel.pipeline=2", "backend.fp8=delayed"), lambda r: [r], 2),
    "data2_fp8": (("parallel.data=2", "backend.fp8=current"), lambda r: [0, 1], 1),
}


def communication(root: Path) -> dict:
    """The collectives of one forward + backward, plain and with TE (fused), at tensor 2 +- SP."""
    out = {}
    for label, extra in (("tp2", TP2), ("tp2_sp", TP2_SP)):
        cfg = run_config(root, *extra)
        ctx = context_for(cfg)
        for kernels in ("plain", "te"):
            model = build_model(cfg, ctx, FUSED if kernels == "te" else BackendChoice())
            with count_comm() as counted:
                model(Tokens(VOCAB, SEQ).data[:2, :SEQ]).float().square().mean().backward()
            out[label, kernels] = (dict(counted.calls), dict(counted.payload_bytes))
    return out


def te_ranks(root: str) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        log = install_fake_te(patch)
        results = {name: te_case(Path(root) / name, extra, log) for name, extra in CASES.items()}
        results["communication"] = communication(Path(root) / "communication")
        for name, (extra, _, _) in FP8_GROUP_CASES.items():
            results[name] = te_case(Path(root) / name, extra, log)
        results["checkpoints"] = checkpoint_cases(Path(root), log)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, dict[str, list[float]], list[dict]]:
    """One spawn of 2 ranks for every case; first, one plain process trains, saves and continues."""
    root = tmp_path_factory.mktemp("te")
    cfg = run_config(root / "plain", "backend.linear=torch")
    plain, _ = product_trainer(cfg, Tokens(VOCAB, SEQ), root / "plain")
    reference = {"first": losses(plain)}
    plain.save()
    plain.checkpointer.wait()
    reference["after_plain_checkpoint"] = losses(plain)
    for name, extra in (("parallel", ()), ("sequential", SEQUENTIAL)):
        cfg = run_config(root / f"plain_{name}", "backend.linear=torch", *extra)
        reference[name] = losses(product_trainer(cfg, Tokens(VOCAB, SEQ), root / f"plain_{name}")[0])
    ranks = run_distributed(te_ranks, 2, root=str(root), timeout_s=HANG_GUARD_S)
    return root, reference, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_te_at_tensor_2_equals_one_plain_process(spawned, case):
    root, reference, ranks = spawned
    block = "sequential" if "sequential" in case else "parallel"
    cfg = run_config(root, *CASES[case])
    layers = cfg.model.num_layers
    for rank, result in enumerate(r[case] for r in ranks):
        assert result["kernels"] == ("te", cfg.backend.fp8, True), rank
        assert result["names"] == plain_names(cfg), rank
        assert result["our_tp_layers_left"] == 0, rank
        assert result["losses"] == pytest.approx(reference[block], rel=1e-5), rank
        # every block GEMM ran through TE as a local GEMM on the model's own weight shard
        assert {(m["parallel_mode"], m["tp_group"], m["sequence_parallel"]) for m in result["modules"]} == {
            (None, None, False)
        }
        calls = result["calls"]
        forwards = STEPS * 2  # two micro-batches per step
        assert len(calls) == forwards * GEMMS_PER_LAYER * layers and result["calls_on_model_weights"]
        # inside the region every GEMM sees the whole sequence, also under sequence parallelism
        assert {c["shape"][:2] for c in calls} == {(2, SEQ)}
        kinds = [c["kind"] for c in calls[: GEMMS_PER_LAYER * layers]]
        assert kinds == ["LayerNormLinear", "Linear", "LayerNormLinear", "Linear"] * layers


def test_te_communicates_exactly_like_our_layers(spawned):
    """Same collectives, same bytes in a forward + backward: TE modules add none, remove none."""
    _, _, ranks = spawned
    for result in (r["communication"] for r in ranks):
        for label in ("tp2", "tp2_sp"):
            calls, payload = result[label, "te"]
            assert (calls, payload) == result[label, "plain"], label
            assert calls["all_reduce"] and ("all_gather" in calls) == (label == "tp2_sp"), calls


def test_fp8_runs_every_block_gemm_under_autocast_reduced_over_the_stage(spawned):
    _, _, ranks = spawned
    for result in (r["tp2_sp_fp8"] for r in ranks):
        assert all(c["fp8"] for c in result["calls"])
        entries = result["autocast"]
        assert len(entries) == STEPS * 2  # one per micro-batch forward
        # this stage's tensor x data ranks: here both ranks (tensor 2, one stage, one data rank)
        assert all(e["enabled"] and e["group"] == [0, 1] for e in entries)
        assert {e["recipe"] for e in entries} == {"DelayedScaling"}
    for bf16 in (r["tp2_sp"] for r in ranks):  # without backend.fp8: no autocast, no FP8 GEMM
        assert not any(c["fp8"] for c in bf16["calls"]) and not bf16["autocast"]


@pytest.mark.parametrize("case", list(FP8_GROUP_CASES))
def test_fp8_amaxes_are_reduced_over_the_stage_never_across_stages(spawned, case):
    """Pipeline 2: each stage's FP8 modules (its own layer) reduce over that stage's rank only; data
    2: over both data ranks (with tensor 2, above: both tensor ranks). Each layout trains as one
    plain process."""
    _, reference, ranks = spawned
    _, group_of, micro_batches = FP8_GROUP_CASES[case]
    for rank, result in enumerate(r[case] for r in ranks):
        assert result["autocast"] and all(e["group"] == group_of(rank) for e in result["autocast"])
        layers = len(result["modules"]) // GEMMS_PER_LAYER  # built on this rank
        assert len(result["calls"]) == STEPS * micro_batches * GEMMS_PER_LAYER * layers
        assert all(c["fp8"] for c in result["calls"])
        assert result["losses"] == pytest.approx(reference["parallel"], rel=1e-5)


def test_plain_tensor_1_checkpoint_resumes_with_te_at_tensor_2(spawned):
    _, reference, ranks = spawned
    for result in ranks:
        got = result["checkpoints"]["after_plain_checkpoint"]
        assert got == pytest.approx(reference["after_plain_checkpoint"], rel=1e-5)


def test_te_tensor_2_checkpoint_resumes_in_one_plain_process(spawned, tmp_path):
    root, _, ranks = spawned
    expected = ranks[0]["checkpoints"]["after_te_checkpoint"]
    assert expected == ranks[1]["checkpoints"]["after_te_checkpoint"]
    cfg = run_config(tmp_path, "backend.linear=torch")
    trainer, parts = product_trainer(cfg, Tokens(VOCAB, SEQ), tmp_path)
    assert parts.kernels.linear == "torch"
    with pytest.warns(UserWarning, match="random states not restored"):
        assert trainer.resume(root / "te" / "ckpt")
    assert losses(trainer) == pytest.approx(expected, rel=1e-5)
    meta = (next((root / "te" / "ckpt").glob("step_*")) / "metadata.json").read_text()
    assert "_extra_state" not in meta and "layer_norm_weight" not in meta


def test_te_checkpoint_resumes_with_te_in_one_process(spawned, fake_te, tmp_path):
    """Tensor 2 + SP with TE -> one process with TE: the fused modules load through the norms' names."""
    root, _, ranks = spawned
    cfg = run_config(tmp_path)
    trainer, parts = product_trainer(cfg, Tokens(VOCAB, SEQ), tmp_path)
    assert parts.kernels.linear == "te"
    with pytest.warns(UserWarning, match="random states not restored"):
        assert trainer.resume(root / "te" / "ckpt")
    assert losses(trainer) == pytest.approx(ranks[0]["checkpoints"]["after_te_checkpoint"], rel=1e-5)


# --------------------------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _real_te():
    env = probe_environment(torch.device("cuda", 0))
    if not env.transformer_engine.ok:
        pytest.skip(f"Transformer Engine: {env.transformer_engine.problem}")
    return importlib.import_module("transformer_engine.pytorch"), env


@pytest.mark.gpu
@needs_gpu
def test_gpu_fake_has_the_real_signatures():
    """The fake's constructors take what the real ones take, with the same defaults."""
    te, _ = _real_te()
    real = {name: inspect.signature(getattr(te, name)) for name in ("Linear", "LayerNormLinear")}
    with pytest.MonkeyPatch.context() as patch:
        install_fake_te(patch)
        fake_te_mod = importlib.import_module("transformer_engine.pytorch")
        fake = {name: inspect.signature(getattr(fake_te_mod, name)) for name in real}
    ours = {"in_features", "out_features", "bias", "params_dtype", "device", "parallel_mode", "tp_group",
            "tp_size", "sequence_parallel", "fuse_wgrad_accumulation"}  # fmt: skip
    used = {"Linear": ours, "LayerNormLinear": ours | {"eps", "normalization", "zero_centered_gamma"}}
    for name, signature in fake.items():
        # what our code passes exists in both; whatever both have (releases differ) has one default
        assert used[name] <= set(real[name].parameters) & set(signature.parameters), name
        for param in signature.parameters.values():
            if param.name in real[name].parameters:
                assert real[name].parameters[param.name].default == param.default, (name, param.name)


GPU_SHAPE = dict(vocab_size=4096, hidden_size=512, num_layers=2, num_heads=8, head_dim=64, num_kv_heads=2)


def _forward_backward(model: nn.Module, x: torch.Tensor, choice: BackendChoice | None):
    """Logits and two gradients of layer 0 (qkv weight, first norm): fp32 without a choice, else bf16."""
    model.zero_grad(set_to_none=True)
    half = torch.autocast("cuda", dtype=torch.bfloat16, enabled=choice is not None)
    with half, fp8_context(choice or BackendChoice()):
        logits = model(x).float()
    logits.logsumexp(-1).mean().backward()
    block = model.layers["0"]
    norm = block.norm if hasattr(block, "norm") else block.norm1
    return logits.detach(), block.attn.qkv_proj.weight.grad.float(), norm.weight.grad.float()


def _gpu_errors(choice: BackendChoice, block: str = "parallel", norm: str = "layernorm") -> dict[str, float]:
    """Relative errors against fp32 of the plain bf16 path and of `choice`'s: logits and two gradients."""
    cfg = ModelConfig(**GPU_SHAPE, block=block, norm=norm, max_seq_length=512)
    torch.manual_seed(0)
    model = GPTModel(cfg).cuda()
    x = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")
    swapped = copy.deepcopy(model)
    apply_kernels(swapped, choice)
    reference = _forward_backward(model, x, None)
    plain = _forward_backward(model, x, BackendChoice())
    for _ in range(3):  # delayed scaling quantizes with the scales of earlier steps: give it some
        got = _forward_backward(swapped, x, choice)
    errors = {}
    for i, key in enumerate(("logits", "qkv_grad", "norm_grad")):
        scale = reference[i].norm()
        errors[f"plain_{key}"] = ((plain[i] - reference[i]).norm() / scale).item()
        errors[f"te_{key}"] = ((got[i] - reference[i]).norm() / scale).item()
    return errors


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("block", "norm"), [("parallel", "layernorm"), ("sequential", "rmsnorm")])
def test_gpu_fused_te_matches_plain_within_bf16(block, norm):
    _real_te()
    errors = _gpu_errors(BackendChoice(linear="te", fuse_norm=True), block, norm)
    for key in ("logits", "qkv_grad", "norm_grad"):
        assert errors[f"te_{key}"] <= 2 * errors[f"plain_{key}"] + 1e-2, errors


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fp8", ["delayed", "current"])
def test_gpu_fp8_fused_stays_close(fp8):
    _, env = _real_te()
    if env.capability < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    if fp8 == "current" and not env.te_current_scaling:
        pytest.skip("this Transformer Engine has no current scaling")
    errors = _gpu_errors(BackendChoice(linear="te", fp8=fp8, fuse_norm=True))
    # E4M3 keeps 3 mantissa bits (bf16: 7): a relative error of a few percent, well under 10%
    assert errors["te_logits"] < 0.1 and errors["te_qkv_grad"] < 0.2, errors


@pytest.mark.gpu
@needs_gpu
def test_gpu_state_dict_drops_the_real_extra_state():
    _real_te()
    env = probe_environment(torch.device("cuda", 0))
    if env.capability < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    cfg = run_config("unused", "model.hidden_size=64", "model.head_dim=16").model
    model = GPTModel(cfg).cuda()
    names = list(model.state_dict())
    choice = BackendChoice(linear="te", fp8="delayed", fuse_norm=True)
    apply_kernels(model, choice)
    with torch.autocast("cuda", dtype=torch.bfloat16), fp8_context(choice):
        model(torch.randint(0, VOCAB, (2, SEQ), device="cuda")).float().sum().backward()
    assert any(m.get_extra_state().numel() for m in model.modules() if hasattr(m, "fp8_meta"))
    assert list(model.state_dict()) == names
    model.load_state_dict(GPTModel(cfg).cuda().state_dict())  # strict


def _gpu_tp2_rank(root: str, extra: tuple[str, ...]) -> list[float]:
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    cfg = run_config(f"{root}/rank{rank}", *GPU_RUN, *extra)
    ctx = context_for(cfg, f"cuda:{rank}")
    trainer, _ = product_trainer(cfg, Tokens(VOCAB, SEQ), Path(f"{root}/rank{rank}"), ctx=ctx)
    return losses(trainer, 5)


GPU_RUN = ("train.device=cuda", "train.precision=bf16", "model.hidden_size=256", "model.head_dim=32",
           "model.num_heads=8", "model.num_kv_heads=2", "model.ffn_hidden_size=512",
           "backend.linear=te")  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fp8", ["none", "delayed"])
def test_gpu_te_tensor_2_sp_matches_one_gpu(tmp_path, fp8):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _, env = _real_te()
    if fp8 != "none" and env.capability < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    extra = (f"backend.fp8={fp8}",)
    cfg = run_config(tmp_path, *GPU_RUN, *extra)
    single, _ = product_trainer(cfg, Tokens(VOCAB, SEQ), tmp_path, ctx=context_for(cfg, "cuda:0"))
    expected = losses(single, 5)
    ranks = run_distributed(
        _gpu_tp2_rank, 2, backend="nccl", timeout_s=HANG_GUARD_S, root=str(tmp_path), extra=(*TP2_SP, *extra)
    )
    for got in ranks:
        assert got == pytest.approx(expected, rel=3e-2 if fp8 == "none" else 6e-2)
