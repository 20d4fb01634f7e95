"""Where training metrics go: the console (one line per interval, a progress bar), a JSONL file
(always), TensorBoard (when installed) and Weights & Biases (when asked for and installed).

Only the logging rank creates sinks; other ranks get a `MetricsLogger` that drops everything.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from megatron_andromeda.config import LoggingConfig

# Dense bf16 peak FLOP/s per device, for MFU; other devices take logging.peak_flops.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "V100": 125e12,
}


def peak_flops_for(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path | None, total_steps: int, enabled: bool = True):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._wandb = None
        self._start = time.time()
        if not enabled or run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (open for the run)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, run_dir)
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def start_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time() - self._start, 3), **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(
                {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step=step
            )
        self.print(format_line(kind, step, self.total_steps, metrics))

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(cfg: LoggingConfig, run_dir: Path):
    """A W&B run when the package is installed; WANDB_MODE=offline is honoured by wandb itself."""
    try:
        import wandb
    except ImportError:
        print(
            "logging.wandb=true but wandb is not installed (pip install 'megatron_andromeda[wandb]'); "
            "continuing without it",
            file=sys.stderr,
        )
        return None
    return wandb.init(project=cfg.wandb_project, dir=str(run_dir), name=run_dir.name)


def format_line(kind: str, step: int, total: int, m: dict[str, Any]) -> str:
    if kind == "train":
        parts = [
            f"step {step:>6}/{total}",
            f"tokens {_human(m['tokens'])}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.3e}",
            f"grad_norm {m['grad_norm']:.3f}",
            f"tok/s {_human(m['tokens_per_s'])}",
        ]
        if m.get("mfu") is not None:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if m.get("skipped_steps"):
            parts.append(f"skipped {m['skipped_steps']}")
        if m.get("eta_s") is not None:
            parts.append(f"eta {_duration(m['eta_s'])}")
        return " | ".join(parts)
    fields = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
    return f"{kind:>5} step {step:>6} | {fields}"


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
