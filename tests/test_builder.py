"""The one model builder: its transforms run in the documented order and each sees the earlier ones.

TP -> kernels -> recomputation -> compile -> precision (or FSDP2 sharding). For every pair that can
meet, a test checks that the later transform acts on what the earlier one made: recomputation
replays the flash kernel and the TE linears (not the modules they replaced), the fused norms keep
tensor parallelism's hooks, compile keeps the recomputation, the precision cast reaches the
swapped-in modules, and full sharding wraps the compiled, recomputed blocks and gathers the
swapped-in modules' weights in the run's precision. (TE modules holding tensor parallelism's
shards, at tensor 2, are checked in test_te_layers.py.) The kernels are the recording fakes of
fake_kernels.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from megatron_andromeda.builder import build_model
from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.kernels import BackendChoice, FlashCoreAttention, apply_kernels
from megatron_andromeda.models import GPTModel
from megatron_andromeda.models.attention import CoreAttention
from megatron_andromeda.parallel import ParallelContext, plan_layout
from megatron_andromeda.parallel.recompute import apply_recompute

LAYERS = 2


def run_config(*extra: str) -> RunConfig:
    return load_config(
        None,
        [
            "model.vocab_size=96", "model.hidden_size=64", f"model.num_layers={LAYERS}", "model.num_heads=4",
            "model.head_dim=16", "model.ffn_hidden_size=96", "model.max_seq_length=32", "data.seq_length=16",
            "train.micro_batch_size=2", "train.global_batch_size=2", *extra,
        ],
    )  # fmt: skip


def single(cfg: RunConfig) -> ParallelContext:
    return ParallelContext.single(seed=cfg.train.seed, layout=plan_layout(cfg, 1))


def tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(1))


def forward_backward(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach().float()


def test_plain_build_equals_the_unmodified_model():
    cfg = run_config()
    model = build_model(cfg, single(cfg))
    reference = GPTModel(cfg.model, init_seed=cfg.train.seed)
    assert type(model) is GPTModel
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )


def test_flash_then_selective_recompute_replays_the_flash_kernel(fake_flash):
    """The issue 15 bug: with recompute applied first, the wrapper kept calling the SDPA forward."""
    cfg = run_config("parallel.recompute=selective", "train.precision=bf16")
    model = build_model(cfg, single(cfg), BackendChoice(attention="flash2"))
    cores = [m for m in model.modules() if isinstance(m, CoreAttention)]
    assert all(type(c) is FlashCoreAttention and c.recompute == "selective" for c in cores)
    forward_backward(model, tokens(), autocast=True)
    # one call per layer in the forward, one more per layer when the backward recomputes the core
    assert len([c for c in fake_flash if "q" in c]) == 2 * LAYERS


def test_recompute_applied_before_a_kernel_swap_still_calls_the_kernel(fake_flash):
    """Recomputation looks the class's forward up at call time, so even the old order is right."""
    cfg = run_config()
    model = apply_recompute(GPTModel(cfg.model, init_seed=1), "selective")
    apply_kernels(model, BackendChoice(attention="flash2"))
    forward_backward(model.to(torch.bfloat16), tokens())
    assert len([c for c in fake_flash if "q" in c]) == 2 * LAYERS


def test_te_linears_then_full_recompute_replays_the_te_modules(fake_te):
    cfg = run_config("parallel.recompute=full")
    model = build_model(cfg, single(cfg), BackendChoice(linear="te"))
    linears = [
        m for m in model.modules() if type(m).__name__ == "Linear" and type(m).__module__ == "fake_kernels"
    ]
    assert len(linears) == 4 * LAYERS  # qkv, o, gate_up, down of every block
    calls = []
    for m in linears:
        m.register_forward_hook(lambda mod, args, out: calls.append(mod))
    model.train()
    with torch.no_grad():
        model(tokens())
    forward_calls = len(calls)
    assert forward_calls == 4 * LAYERS
    calls.clear()
    model(tokens()).logsumexp(-1).mean().backward()
    recomputed = calls[forward_calls:]
    # the backward re-ran each block's forward through the TE modules (torch stops a recomputation
    # once it has every tensor it needs, so a block's last projection may be skipped)
    blocks_replayed = {
        next(n for n, b in model.layers.items() if any(m is c for m in b.modules())) for c in recomputed
    }
    assert blocks_replayed == set(model.layers), blocks_replayed


def test_fused_norms_keep_earlier_hooks_and_recompute_replays_the_fused_modules(fake_te):
    """TP -> kernels -> recompute, for the fused norm. Tensor parallelism enters its region with a
    forward hook on each norm; the kernel swap turns the norm into a pass-through that keeps the
    hook (which then sees the block's un-normalised input), and full recomputation replays the
    LayerNormLinear modules that now do the norm."""
    cfg = run_config()
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    seen = []
    for block in model.layers.values():
        block.norm.register_forward_hook(lambda mod, args, out: seen.append(out is args[0]))
    apply_kernels(model, BackendChoice(linear="te", fuse_norm=True))
    apply_recompute(model, "full")
    forward_backward(model, tokens())
    # each norm ran in the forward and in the recomputation, passing its input through
    assert seen == [True] * (2 * LAYERS)
    fused_calls = [c for c in fake_te["calls"] if c["kind"] == "LayerNormLinear"]
    assert len(fused_calls) == 2 * 2 * LAYERS  # qkv and gate_up, forward and recomputation


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward outside any recomputed region (its own hooks hide those)."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().sum().backward()
    return total


def test_compile_keeps_the_recomputation():
    x = tokens(4, 16)
    compiled = build_model(
        cfg := run_config(), single(cfg), BackendChoice(compile=True), compile_backend="eager"
    )
    recomputed_cfg = run_config("parallel.recompute=full")
    both = build_model(
        recomputed_cfg, single(recomputed_cfg), BackendChoice(compile=True), compile_backend="eager"
    )
    assert all(b._compiled_call_impl is not None and b.recompute == "full" for b in both.layers.values())
    plain_bytes, recomputed_bytes = saved_bytes(compiled, x), saved_bytes(both, x)
    assert recomputed_bytes < 0.5 * plain_bytes, (recomputed_bytes, plain_bytes)
    torch.testing.assert_close(both(x), compiled(x))


@pytest.mark.parametrize("fuse_norm", [False, True])
def test_precision_reaches_the_swapped_in_modules(fake_te, fake_flash, fuse_norm):
    cfg = run_config("train.precision=bf16", "parallel.recompute=selective")
    model = build_model(cfg, single(cfg), BackendChoice(attention="flash2", linear="te", fuse_norm=fuse_norm))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    te = [m for m in model.modules() if type(m).__module__ == "fake_kernels"]
    assert len(te) == 4 * LAYERS and not any(type(m) is nn.Linear for m in model.layers.modules())
    assert all(
        isinstance(b, torch.Tensor) and b.dtype == torch.float32 for b in model.buffers()
    )  # tables stay (and the fused LayerNorm's zero bias, which TE casts as it reads it)
    model(tokens())  # bf16 parameters and activations: TE's dtype check passes
    assert {c["dtype"] for c in fake_te["calls"]} == {torch.bfloat16}


@pytest.fixture
def one_rank_group():
    """A real (gloo) process group of one rank, so that FSDP2 shards over a data mesh of one."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_context(cfg: RunConfig) -> ParallelContext:
    # plan_layout leaves one data rank unsharded; the builder is given full sharding regardless
    return ParallelContext.build(
        dataclasses.replace(plan_layout(cfg, 1), data_sharding="full"), seed=cfg.train.seed
    )


def test_sharding_wraps_the_blocks_that_recomputation_and_compile_made(one_rank_group):
    x = tokens(4, 16)
    cfg = run_config("parallel.recompute=full")
    plain = build_model(cfg, single(cfg), BackendChoice(compile=True), compile_backend="eager")
    sharded = build_model(cfg, sharded_context(cfg), BackendChoice(compile=True), compile_backend="eager")
    blocks = list(sharded.layers.values())
    assert isinstance(sharded, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks)
    assert all(b._compiled_call_impl is not None and b.recompute == "full" for b in blocks)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    no_recompute = build_model(
        run_config(), single(cfg), BackendChoice(compile=True), compile_backend="eager"
    )
    # FSDP2's unit boundaries save nothing of their own: the recomputed blocks keep only their inputs
    assert saved_bytes(sharded, x) == saved_bytes(plain, x) < 0.5 * saved_bytes(no_recompute, x)
    for model in (plain, sharded):
        model.zero_grad()
        model(x).logsumexp(-1).mean().backward()
    torch.testing.assert_close(sharded(x), plain(x), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sharding_keeps_fp32_masters_and_computes_in_the_run_precision(one_rank_group, fake_te):
    cfg = run_config("train.precision=bf16")
    model = build_model(cfg, sharded_context(cfg), BackendChoice(linear="te"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the shards are the masters
    seen = []
    for m in model.modules():
        if type(m).__module__ == "fake_kernels":
            m.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
    forward_backward(model, tokens(), autocast=True)
    assert seen and set(seen) == {torch.bfloat16}  # gathered in bf16 into the swapped-in TE linears
    reference = GPTModel(cfg.model, init_seed=cfg.train.seed)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.full_tensor(), q.to(torch.bfloat16).float()), name  # the plain cast's weights
