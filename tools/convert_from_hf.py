#!/usr/bin/env python3
"""Import a Hugging Face model directory (Cohere, StableLM, Llama or MPT) as an Andromeda checkpoint.

    python tools/convert_from_hf.py --hf hf/x --output ckpt/x
    python -m megatron_andromeda.train --config ckpt/x/config.json train.init_from=ckpt/x data.train=...

The checkpoint holds the weights in fp32 and a run config (its config.json, YAML-readable) whose
model section describes the imported architecture; `--config` supplies the other sections
(optimizer, data, ...). `--tensor N --pipeline M` cuts the weights into one file per tensor x
pipeline rank; any layout loads the checkpoint either way (the cut only saves ranks slicing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_andromeda.checkpoint import write_model_checkpoint
from megatron_andromeda.checkpoint.reshard import relayout_config
from megatron_andromeda.config import ConfigError, ModelConfig, RunConfig, load_config
from megatron_andromeda.hf import ConversionError, load_hf_directory, run_config_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--config", help="run config YAML for the non-model sections (default: built-in defaults)")
    p.add_argument(
        "--tokenizer", help="tokenizer for data.tokenizer (default: the directory's tokenizer.json)"
    )
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree of the written checkpoint")
    p.add_argument(
        "--pipeline", type=int, default=1, help="pipeline-parallel degree of the written checkpoint"
    )
    return p.parse_args(argv)


def check_layout(tensor: int, pipeline: int, model: ModelConfig | None = None) -> None:
    """The output layout must split the model: heads, FFN and vocabulary over tensor, layers over pipeline."""
    if tensor < 1 or pipeline < 1:
        raise ConversionError(f"--tensor {tensor} and --pipeline {pipeline} must be >= 1")
    if model is not None:
        try:
            relayout_config(RunConfig(model=model), tensor, pipeline)
        except ConfigError as e:
            raise ConversionError(f"--tensor {tensor} --pipeline {pipeline}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_layout(args.tensor, args.pipeline)
        hf_dir = Path(args.hf)
        tokenizer = args.tokenizer or (
            hf_dir / "tokenizer.json" if (hf_dir / "tokenizer.json").is_file() else None
        )
        model_cfg, state = load_hf_directory(hf_dir)
        check_layout(args.tensor, args.pipeline, model_cfg)
        base = load_config(args.config) if args.config else None
        run_cfg = run_config_for(model_cfg, tokenizer, base)
        output = write_model_checkpoint(
            args.output, run_cfg, state, tensor=args.tensor, pipeline=args.pipeline
        )
    except (ConversionError, ConfigError, OSError) as e:
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print("note: no tokenizer.json in --hf and no --tokenizer given; data.tokenizer is left empty")
    params = sum(t.numel() for t in state.values())
    print(f"wrote {model_cfg.name} ({params:,} parameters) to {output}; continue training with "
          f"--config {output}/config.json train.init_from={output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
