"""Tensor (and sequence) parallelism on gloo against the single-process model, in fp32.

Every rank builds the same full model from one seed and shards it, so the comparison is exact up to
the order of floating-point sums. Tolerances (fp32): logits and gradients rtol 1e-5 / atol 1e-6,
losses rtol 1e-5; the largest differences measured are 2.7e-7 (logits), 9e-8 (gradients) and 2.6e-7
(relative, losses over 10 steps). One spawn per world size runs every case.
"""

from __future__ import annotations

import pytest
import torch

from megatron_andromeda.config import ModelConfig, ParallelConfig
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.parallel import (
    ParallelContext,
    RankLayout,
    finalize_tp_grads,
    make_grad_norm_fn,
    make_loss_fn,
    parallelize_model,
)
from megatron_andromeda.parallel.sharding import merge_param
from megatron_andromeda.parallel.testing import run_distributed

RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH, SEQ = 10, 2, 16
PALM = dict(block="parallel", activation="swiglu", position_embedding="rotary", norm="layernorm")
MPT = dict(block="sequential", activation="gelu", position_embedding="alibi", norm="rmsnorm")

# (model overrides, sequence parallel, real vocabulary size or None); num_kv_heads covers multi-query
# (replicated on every rank), grouped with fewer KV heads than ranks (replicated on some) and split.
CASES = {
    2: [
        (dict(PALM, num_kv_heads=1), False, 250),
        (dict(PALM, num_kv_heads=2, tie_embeddings=False), True, None),
        (dict(MPT, num_kv_heads=1), True, None),
        (dict(MPT, num_kv_heads=4), False, 200),
    ],
    4: [
        (dict(PALM, num_kv_heads=1), True, 250),
        (dict(PALM, num_kv_heads=2), False, None),
        (dict(MPT, num_kv_heads=1, tie_embeddings=False), False, None),
        (dict(MPT, num_kv_heads=4), True, None),
    ],
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, max_seq_length=SEQ, z_loss=1e-2)
    return ModelConfig(**{**base, **overrides})


def run_case(ctx: ParallelContext, overrides: dict, sp: bool, real_vocab: int | None) -> dict:
    """10 AdamW steps on one batch; returns step 0's logits, gradients and norm, and every loss."""
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    model = parallelize_model(GPTModel(cfg), ctx, ParallelConfig(tensor=ctx.tp_size, sequence_parallel=sp))
    loss_fn = make_loss_fn(ctx, real_vocab_size=real_vocab)
    grad_norm = make_grad_norm_fn(model, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, real_vocab or cfg.vocab_size, (BATCH, SEQ + 1), generator=data)  # memorised
    loss_mask = (torch.rand(BATCH, SEQ, generator=data) > 0.2).float()
    out: dict = {"losses": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        loss, parts = loss_fn(logits, tokens[:, 1:], loss_mask, z_loss=cfg.z_loss)
        loss.backward()
        finalize_tp_grads(model, ctx)
        if step == 0:
            out["logits"] = logits.detach().clone()
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            out["grad_norm"] = grad_norm().item()
            out["z_loss"] = parts["z_loss"].item()
        out["losses"].append(loss.item())
        optimizer.step()
    return out


def tp_worker() -> dict:
    world_size = torch.distributed.get_world_size()
    ctx = ParallelContext.build(RankLayout(tp=world_size, pp=1, dp=1))
    results = {"cases": [run_case(ctx, *case) for case in CASES[world_size]]}
    results["dropout"] = dropout_check(ctx)
    return results


def dropout_check(ctx: ParallelContext) -> dict:
    """Residual-stream dropout must agree across tensor ranks; tensor-parallel streams must differ."""
    cfg = tiny_config(**PALM, dropout=0.3)
    torch.manual_seed(0)
    model = parallelize_model(GPTModel(cfg), ctx, ParallelConfig(tensor=ctx.tp_size))
    seen = {}
    model.final_norm.register_forward_pre_hook(lambda m, args: seen.setdefault("hidden", args[0].detach()))
    torch.manual_seed(5)  # the trainer seeds the default generator identically on every rank
    model.train()(torch.randint(0, cfg.vocab_size, (BATCH, SEQ)))
    default_draw = torch.rand(4)
    with ctx.rng.fork("tensor-parallel"):
        tp_draw = torch.rand(4)
    return {"hidden": seen["hidden"], "default_draw": default_draw, "tp_draw": tp_draw}


def reference(overrides: dict, real_vocab: int | None) -> dict:
    torch.set_num_threads(1)
    return run_case(ParallelContext.single(), overrides, False, real_vocab)


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_run(request):
    world_size = request.param
    return world_size, run_distributed(tp_worker, world_size)


def test_matches_single_process(tp_run):
    world_size, ranks = tp_run
    for index, (overrides, sp, real_vocab) in enumerate(CASES[world_size]):
        label = f"tp={world_size} sp={sp} {overrides}"
        ref = reference(overrides, real_vocab)
        shards = [r["cases"][index] for r in ranks]
        logits = torch.cat([s["logits"] for s in shards], dim=-1)  # vocabulary shards
        torch.testing.assert_close(
            logits, ref["logits"], rtol=RTOL, atol=ATOL, msg=lambda m, lb=label: f"{lb}: logits {m}"
        )
        cfg = tiny_config(**overrides)
        for name, ref_grad in ref["grads"].items():
            merged = merge_param(
                name, [s["grads"][name] for s in shards], cfg
            )  # checks replicas agree exactly
            torch.testing.assert_close(
                merged, ref_grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name, lb=label: f"{lb}: {n} {m}"
            )
        for s in shards:
            assert s["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), label
            assert s["z_loss"] == pytest.approx(ref["z_loss"], rel=RTOL), label
            assert s["losses"] == pytest.approx(ref["losses"], rel=RTOL), label
        assert ref["losses"][-1] < ref["losses"][0] - 0.1, f"{label}: training did not move the loss"


def test_dropout_streams(tp_run):
    world_size, ranks = tp_run
    checks = [r["dropout"] for r in ranks]
    for other in checks[1:]:
        assert torch.equal(other["hidden"], checks[0]["hidden"]), "replicated residual stream differs"
        assert torch.equal(other["default_draw"], checks[0]["default_draw"])
        assert not torch.equal(other["tp_draw"], checks[0]["tp_draw"]), "tensor-parallel streams must differ"


def test_vocab_padding_is_masked_single_process():
    """Padding logits do not change the loss: raising them leaves it equal to the unpadded loss."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 256), torch.randint(0, 250, (2, 5))
    loss_fn = make_loss_fn(ParallelContext.single(), real_vocab_size=250)
    boosted = logits.clone()
    boosted[..., 250:] += 100.0
    plain = make_loss_fn(ParallelContext.single())(logits[..., :250], labels, z_loss=1e-2)[0]
    assert loss_fn(boosted, labels, z_loss=1e-2)[0].item() == pytest.approx(plain.item(), rel=1e-6)


def test_cases_cover_both_blocks_and_sp():
    for cases in CASES.values():
        assert {(o["block"], sp) for o, sp, _ in cases} == {
            (b, s) for b in ("parallel", "sequential") for s in (0, 1)
        }
        assert {o["num_kv_heads"] for o, _, _ in cases} >= {1, 4}


def test_parameter_names_survive(tp_run):
    world_size, ranks = tp_run
    names = {n for n, _ in GPTModel(tiny_config(**CASES[world_size][0][0])).named_parameters()}
    assert set(ranks[0]["cases"][0]["grads"]) == names
