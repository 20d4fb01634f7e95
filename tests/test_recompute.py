"""Activation recomputation gives the same gradients as storing everything, and stores less.

Dropout is on in every case, so the recomputed forward must replay the same masks: the default
generator (torch's checkpoint) and, under tensor parallelism, the tracker's tensor-parallel stream
(checked on 2 gloo processes, in test_pipeline.py's spawn).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from megatron_andromeda.config import ModelConfig, ParallelConfig
from megatron_andromeda.models.gpt import GPTModel, language_model_loss
from megatron_andromeda.parallel import (
    ParallelContext,
    RankLayout,
    finalize_tp_grads,
    make_loss_fn,
    parallelize_model,
)
from megatron_andromeda.parallel.recompute import apply_recompute

PALM = dict(block="parallel", activation="swiglu", position_embedding="rotary", norm="layernorm")
MPT = dict(block="sequential", activation="gelu", position_embedding="alibi", norm="rmsnorm", num_kv_heads=4)
SEQ = 8


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, max_seq_length=SEQ, dropout=0.2)
    return ModelConfig(**{**base, **overrides})


def gradients(cfg: ModelConfig, mode: str, device: str = "cpu") -> tuple[dict, int]:
    """Gradients of one training step with dropout, and the number of tensors autograd saved."""
    model = apply_recompute(GPTModel(cfg, init_seed=3), mode).to(device).train()
    data = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ + 1), generator=data).to(device)
    segment_ids = torch.tensor([[0] * 3 + [1] * 5, [0] * 8], device=device)  # two packed documents
    saved = []
    torch.manual_seed(11)
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = model(tokens[:, :-1], segment_ids=segment_ids)
    loss, _ = language_model_loss(logits, tokens[:, 1:], z_loss=1e-3)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, len(saved)


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", [PALM, MPT], ids=["palm", "mpt"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_keeps_gradients(arch, mode, device):
    cfg = tiny(**arch)
    reference, stored = gradients(cfg, "none", device)
    grads, stored_recompute = gradients(cfg, mode, device)
    atol = 0 if device == "cpu" else 1e-6  # CUDA attention backward may sum in a different order
    for name, grad in reference.items():
        torch.testing.assert_close(
            grads[name], grad, rtol=0, atol=atol, msg=lambda m, n=name: f"{mode} {n}: {m}"
        )
    assert stored_recompute < stored, (
        f"{mode} recomputation saved {stored_recompute} tensors, no fewer than {stored}"
    )


def test_recompute_keeps_parameter_names_and_rejects_bad_modes():
    cfg = tiny(**PALM)
    names = [n for n, _ in GPTModel(cfg).named_parameters()]
    model = apply_recompute(GPTModel(cfg), "full")
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="already recomputes"):
        apply_recompute(model, "full")
    with pytest.raises(ValueError, match="parallel.recompute='partial'"):
        apply_recompute(GPTModel(cfg), "partial")


def test_eval_and_no_grad_run_plain_forward():
    cfg = tiny(**PALM, dropout=0.0)
    plain, recomputed = GPTModel(cfg, init_seed=1), apply_recompute(GPTModel(cfg, init_seed=1), "full")
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(recomputed.eval()(tokens), plain.eval()(tokens), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ tensor parallel
def tensor_parallel_checks() -> dict:
    """On 2 ranks (run by test_pipeline's spawn): gradients of one step under each mode, dropout on.

    Tensor-parallel attention dropout draws from the tracker's stream, which a full recompute of
    the block must rewind; every mode starts from the same stream and default-generator state.
    """
    ctx = ParallelContext.build(RankLayout(tp=2, pp=1, dp=1))
    cfg = tiny(**PALM)
    loss_fn = make_loss_fn(ctx)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", "full", "selective"):
        model = parallelize_model(GPTModel(cfg, init_seed=3), ctx, ParallelConfig(tensor=2))
        apply_recompute(model, mode, ctx.rng).train()
        ctx.rng.set_states({})
        torch.manual_seed(11)
        loss, _ = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        finalize_tp_grads(model, ctx)
        results[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return results


def test_recompute_replays_tensor_parallel_dropout():
    from test_pipeline import spawn_results

    for rank, result in enumerate(r["recompute"] for r in spawn_results(2)):
        for mode in ("full", "selective"):
            for name, grad in result["none"].items():
                torch.testing.assert_close(
                    result[mode][name],
                    grad,
                    rtol=0,
                    atol=0,
                    msg=lambda m, n=name, r=rank, o=mode: f"{r} {o} {n}: {m}",
                )
