"""Checkpoint save / load time and the training stall of synchronous vs asynchronous saves, on CPU.

The model is the full andromeda-100m (106 M parameters; `--layers` shrinks it) with torch's
AdamW after one real step, so a checkpoint holds 4 bytes of weights and 8 bytes of Adam moments
per parameter (about 1.3 GB) plus JSON. Measured in one run:

- sync save: `Checkpointer.save(blocking=True)`: streamed safetensors, sha256 of every byte, fsync,
  manifest, rename, `latest`; training waits for all of it;
- async save: the stall is the time `save()` takes to copy the state to host memory and return
  (steady state: the buffers of the previous save are reused; the first save's is also shown);
  then training steps run while the background thread writes, and we report their time against
  undisturbed steps (on 2 shared cores the writer competes with training for CPU and disk);
- load: `load_checkpoint` into a fresh model and optimizer, hashes checked;
- reference: `torch.save` of model and optimizer state_dicts (one pickle, no checksum, no fsync)
  and `torch.load(weights_only=True)` of it.

    .venv/bin/python benchmarks/bench_checkpoint.py [--layers 8] [--threads 2] [--dir /tmp] [--json out.json]

Ratios are reference time / our time (>= 1.0: ours is at least as fast); the stall ratio is
sync stall / async stall (how many times less training waits).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from megatron_andromeda.checkpoint import Checkpointer, Placement, load_checkpoint
from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.training.optim import build_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8, help="number of layers (andromeda-100m has 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="tokens per training step (batch 1)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def run_config(root: Path, layers: int, seq: int, async_save: bool) -> RunConfig:
    overrides = ["model=andromeda-100m", f"model.num_layers={layers}", f"data.seq_length={seq}",
                 "model.dropout=0.0", f"checkpoint.save_dir={root}", "checkpoint.keep_last=1",
                 f"checkpoint.async_save={str(async_save).lower()}"]  # fmt: skip
    return load_config(None, overrides)


def train_step(model: GPTModel, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    loss, _ = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(root: Path, args: argparse.Namespace) -> dict[str, float]:
    cfg = run_config(root / "sync", args.layers, args.seq, async_save=False)
    model = GPTModel(cfg.model, init_seed=0)
    optimizer = build_optimizer(model, cfg.optim)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (1, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    train_step(model, optimizer, tokens)  # Adam moments exist from here on
    steps = [train_step(model, optimizer, tokens) for _ in range(3)]
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_s": min(steps)}
    state = {"step": 4}

    sync = Checkpointer(cfg, Placement())
    out["sync_save_s"] = timed(lambda: sync.save(4, model, optimizer, state, blocking=True))
    out["checkpoint_gb"] = sum(f.stat().st_size for f in (root / "sync" / "step_00000004").iterdir()) / 1e9

    background = Checkpointer(run_config(root / "async", args.layers, args.seq, async_save=True), Placement())
    out["async_first_stall_s"] = timed(lambda: background.save(3, model, optimizer, state))
    background.wait()  # the next save copies into the host buffers this one allocated
    out["async_stall_s"] = timed(lambda: background.save(4, model, optimizer, state))
    overlapped = []
    while background.in_flight:
        overlapped.append(train_step(model, optimizer, tokens))
    out["async_total_s"] = out["async_stall_s"] + sum(overlapped) + timed(background.wait)
    out["steps_during_async"] = len(overlapped)
    out["step_during_async_s"] = sum(overlapped) / max(len(overlapped), 1)

    fresh = GPTModel(cfg.model, init_seed=1)
    fresh_opt = build_optimizer(fresh, cfg.optim)
    out["load_s"] = timed(lambda: load_checkpoint(root / "sync", fresh, fresh_opt, restore_rng=False))
    reference = root / "reference.pt"
    out["torch_save_s"] = timed(
        lambda: torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, reference)
    )
    out["torch_load_s"] = timed(lambda: torch.load(reference, weights_only=True))
    return out


def report(r: dict[str, float]) -> None:
    print(f"model: andromeda-100m, {r['params_m']:.1f} M parameters; checkpoint {r['checkpoint_gb']:.2f} GB; "
          f"training step {r['step_s']:.2f} s")  # fmt: skip
    print(f"{'':34s}{'ours':>10s}{'reference':>12s}{'ratio':>8s}")
    rows = [
        ("save (sync, hashed, fsynced) [s]", r["sync_save_s"], r["torch_save_s"]),
        ("load (hashes checked) [s]", r["load_s"], r["torch_load_s"]),
    ]
    for name, ours, ref in rows:
        print(f"{name:34s}{ours:10.2f}{ref:12.2f}{ref / ours:8.2f}   (reference: torch.save / torch.load)")
    print(f"{'training stall, sync save [s]':34s}{r['sync_save_s']:10.2f}")
    print(f"{'training stall, async save [s]':34s}{r['async_stall_s']:10.2f}{'':12s}"
          f"{r['sync_save_s'] / r['async_stall_s']:8.2f}   (sync stall / async stall)")  # fmt: skip
    print(f"  (the first async save allocates its host buffers: {r['async_first_stall_s']:.2f} s)")
    during, alone = r["step_during_async_s"], r["step_s"]
    print(f"async save completed after {r['async_total_s']:.2f} s; {r['steps_during_async']} steps "
          f"ran meanwhile at {during:.2f} s each (undisturbed: {alone:.2f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        results = measure(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
