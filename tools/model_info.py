#!/usr/bin/env python3
"""Parameter count, training FLOPs per token and training memory of a model preset or config.

python tools/model_info.py --model andromeda-1b [--seq-length 2048] [--precision bf16] [--json]
python tools/model_info.py --config examples/configs/andromeda_1b.yaml

Memory follows the precision of the weights: the config's `train.precision` (bf16 for a preset,
as on GPUs), or `--precision`. bf16 / fp16 weights take 2 bytes plus a 4-byte fp32 master copy;
fp32 weights take 4 bytes and are their own masters.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_andromeda.config import ConfigError, ModelConfig, load_config
from megatron_andromeda.errors import report_user_errors
from megatron_andromeda.models.accounting import (
    WEIGHT_BYTES,
    count_parameters,
    training_flops_per_token,
    training_memory,
)
from megatron_andromeda.models.presets import get_preset


def model_info(cfg: ModelConfig, seq_length: int, precision: str = "bf16") -> dict:
    counts = count_parameters(cfg)
    memory = training_memory(cfg, precision=precision)
    return {
        "model": cfg.name,
        "parameters": counts.total,
        "non_embedding_parameters": counts.non_embedding,
        "embedding_parameters": counts.embedding + counts.lm_head,
        "seq_length": seq_length,
        "training_flops_per_token": training_flops_per_token(cfg, seq_length),
        "precision": precision,
        "memory_bytes": memory.as_dict(),
        "shape": {
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "head_dim": cfg.kv_channels,
            "num_kv_heads": cfg.num_kv_heads,
            "ffn_size": cfg.ffn_size,
            "vocab_size": cfg.vocab_size,
            "block": cfg.block,
        },
    }


def format_table(info: dict) -> str:
    gib = 2**30
    mem = info["memory_bytes"]
    rows = [
        ("model", info["model"]),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)"),
        ("  non-embedding", f"{info['non_embedding_parameters']:,}"),
        ("  embedding (+ untied head)", f"{info['embedding_parameters']:,}"),
        (
            f"training FLOPs / token (seq {info['seq_length']})",
            f"{info['training_flops_per_token'] / 1e9:.3f} GFLOP",
        ),
        (f"weights ({info['precision']})", f"{mem['weights'] / gib:.2f} GiB"),
        ("gradients (fp32)", f"{mem['gradients'] / gib:.2f} GiB"),
        ("master weights (fp32)", master_weights(info["precision"], mem["master_weights"] / gib)),
        ("Adam states (fp32 m, v)", f"{mem['optimizer_states'] / gib:.2f} GiB"),
        ("total model state", f"{mem['total'] / gib:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def master_weights(precision: str, gib: float) -> str:
    return "none: fp32 weights are their own masters" if precision == "fp32" else f"{gib:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a preset name, e.g. andromeda-1b")
    source.add_argument("--config", help="a run config YAML (its model section is used)")
    parser.add_argument(
        "--seq-length", type=int, default=None, help="default: the config's data.seq_length or 2048"
    )
    parser.add_argument(
        "--precision",
        choices=sorted(WEIGHT_BYTES),
        default=None,
        help="the weights' dtype (default: the config's train.precision; bf16 for --model)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.model:
            cfg, seq, precision = get_preset(args.model), 2048, "bf16"
        else:
            run = load_config(args.config)
            cfg, seq, precision = run.model, run.data.seq_length, run.train.precision
    except ConfigError as err:
        parser.error(str(err))
    info = model_info(cfg, args.seq_length or seq, args.precision or precision)
    print(json.dumps(info) if args.json else format_table(info))
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
