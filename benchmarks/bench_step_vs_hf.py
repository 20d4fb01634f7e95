"""One training step of our PaLM-style GPTModel vs Hugging Face `CohereForCausalLM`, same run.

Both models have the same architecture and the same parameters: parallel block (one bias-free
LayerNorm feeding attention and a SwiGLU MLP), interleaved rotary, one KV head, tied embeddings.
Cohere is built from ours by the project's converter (`megatron_andromeda.hf.to_hf`), and the
script checks that both give the same logits before timing, so the two sides do the same math.

A timed step is forward + cross-entropy over all B*T tokens + backward + `zero_grad(set_to_none=True)`,
with no optimizer step. Our loss is `language_model_loss` (what the trainer calls, z-loss off); Cohere's
is `F.cross_entropy` on its logits (its `labels=` path would shift the labels and drop one token per row).
Steps alternate ours / theirs so that drift and CPU contention hit both sides alike.

    .venv/bin/python benchmarks/bench_step_vs_hf.py                 # 2 threads, 8 x 256 tokens
    .venv/bin/python benchmarks/bench_step_vs_hf.py --threads 1 --steps 20 --json out.json

The ratio printed is theirs_ms / ours_ms: >= 1.0 means ours is at least as fast.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda.config import ModelConfig
from megatron_andromeda.hf import to_hf
from megatron_andromeda.models import GPTModel, language_model_loss

try:
    from transformers import CohereForCausalLM
except ImportError:  # pragma: no cover - transformers is a dev dependency
    sys.exit("bench_step_vs_hf.py needs Hugging Face transformers: pip install transformers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both models")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024, help="SwiGLU width (per branch)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = p.parse_args(argv)
    for name in ("threads", "batch", "seq", "hidden", "layers", "heads", "ffn", "vocab", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    return args


def build_models(args: argparse.Namespace) -> tuple[GPTModel, CohereForCausalLM]:
    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=1,
        ffn_hidden_size=args.ffn,
        block="parallel",
        norm="layernorm",
        activation="swiglu",
        position_embedding="rotary",
        rotary_interleaved=True,
        max_seq_length=args.seq,
        tie_embeddings=True,
        z_loss=0.0,
    )
    cfg.validate()
    torch.manual_seed(0)
    ours = GPTModel(cfg)
    # The project's exact converter gives Cohere's config (theta, eps, no bias / qk-norm, no pad row)
    # and weights (q/k/v and gate/up split); main() checks that the logits agree.
    hf_config, hf_state = to_hf(cfg, ours.state_dict())
    hf_config._attn_implementation = "sdpa"  # transformers' fastest CPU attention (fused, causal)
    theirs = CohereForCausalLM(hf_config)
    missing = theirs.load_state_dict(hf_state, strict=False).missing_keys
    if missing != ["lm_head.weight"] or theirs.lm_head.weight is not theirs.model.embed_tokens.weight:
        raise RuntimeError(f"Cohere's weights did not load as a tied model (missing: {missing})")
    return ours.train(), theirs.train()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


def ours_step(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    loss, _ = language_model_loss(model(tokens), labels, z_loss=0.0)
    loss.backward()
    model.zero_grad(set_to_none=True)


def theirs_step(model: CohereForCausalLM, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    logits = model(input_ids=tokens, use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def max_logit_diff(ours: GPTModel, theirs: CohereForCausalLM, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(input_ids=tokens, use_cache=False).logits).abs().max().item()


def time_alternating(steps: dict[str, Callable[[], None]], warmup: int, timed: int) -> dict[str, list[float]]:
    """Run each step `warmup` times untimed, then `timed` times each, interleaved; seconds per step."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(timed):
        order = list(steps.items()) if i % 2 == 0 else list(reversed(steps.items()))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summarize(seconds: list[float], tokens_per_step: int) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    median = statistics.median(ms)
    return {"median_ms": median, "iqr_ms": q3 - q1, "tokens_per_s": tokens_per_step / (median / 1e3)}


def write_json(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if path == "-":
        print(text)
        return
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        f.write(text + "\n")
    os.replace(f.name, path)


def print_table(args: argparse.Namespace, diff: float, results: dict, ratio: float, paired: float) -> None:
    print(
        f"one training step (fwd + CE + bwd + zero_grad, no optimizer), fp32, {args.threads} threads, "
        f"batch {args.batch} x {args.seq}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"1 KV head, ffn {args.ffn}, vocab {args.vocab}; {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"max |logits ours - logits Cohere| = {diff:.2e}")
    print(f"{'model':<24}{'params':>12}{'median ms':>12}{'IQR ms':>10}{'tokens/s':>12}")
    for name, label in (("ours", "ours (GPTModel)"), ("theirs", "HF CohereForCausalLM")):
        r = results[name]
        print(
            f"{label:<24}{r['params']:>12,}{r['median_ms']:>12.1f}{r['iqr_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
        )
    verdict = "ours at least as fast" if ratio >= 1.0 else "ours slower"
    print(f"ratio theirs/ours = {ratio:.3f} ({verdict}); median of per-pair ratios = {paired:.3f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ours, theirs = build_models(args)
    counts = {"ours": num_params(ours), "theirs": num_params(theirs)}
    if counts["ours"] != counts["theirs"]:
        raise RuntimeError(f"parameter counts differ: {counts}; the shapes are not the same model")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    diff = max_logit_diff(ours, theirs, tokens)
    if diff > 1e-3:
        raise RuntimeError(f"logits differ by {diff:.2e}: the two models do not compute the same function")

    steps = {
        "ours": lambda: ours_step(ours, tokens, labels),
        "theirs": lambda: theirs_step(theirs, tokens, labels),
    }
    times = time_alternating(steps, args.warmup, args.steps)
    n_tok = args.batch * args.seq
    results = {name: {"params": counts[name], **summarize(t, n_tok)} for name, t in times.items()}
    ratio = results["theirs"]["median_ms"] / results["ours"]["median_ms"]
    # Pairs ran back to back, so their ratios are the least sensitive to load from other processes.
    paired = statistics.median(t / o for t, o in zip(times["theirs"], times["ours"]))
    print_table(args, diff, results, ratio, paired)

    payload = {
        "args": vars(args),
        "max_logit_diff": diff,
        "results": results,
        "ratio": ratio,
        "paired_ratio_median": paired,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
