#!/usr/bin/env python3
"""Import a Hugging Face model directory (Cohere, StableLM, Llama or MPT) as an Andromeda checkpoint.

    python tools/convert_from_hf.py --hf hf/x --output ckpt/x
    python -m megatron_andromeda.train --config ckpt/x/config.json train.init_from=ckpt/x data.train=...

The checkpoint holds the weights in fp32 and a run config (its config.json, YAML-readable) whose
model section describes the imported architecture; `--config` supplies the other sections
(optimizer, data, ...). `--tensor N --pipeline M` cuts the weights into one file per tensor x
pipeline rank; any layout loads the checkpoint either way (the cut only saves ranks slicing).

The vocabulary is padded with zero rows to `--vocab-size` (default: the Hugging Face vocabulary
rounded up to a multiple of `--tensor`, which the tensor split needs). Give your training config's
model.vocab_size to continue a run whose vocabulary was padded (an export drops the padding rows,
see tools/convert_to_hf.py). Padding rows are never sampled or scored: the tokenizer's size says
which ids are real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_andromeda.checkpoint import write_model_checkpoint
from megatron_andromeda.checkpoint.reshard import relayout_config
from megatron_andromeda.config import ConfigError, ModelConfig, RunConfig, load_config
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.errors import UserError, print_error, report_user_errors
from megatron_andromeda.hf import ConversionError, load_hf_directory, run_config_for
from megatron_andromeda.models.vocab import check_real_vocab_size, resize_vocabulary


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
    p.add_argument(
        "--vocab-size",
        type=int,
        help="pad the vocabulary to this many rows, e.g. the training config's model.vocab_size "
        "(default: the Hugging Face vocab_size rounded up to a multiple of --tensor)",
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


def pad_vocabulary(
    cfg: ModelConfig, state: dict, vocab_size: int | None, tensor: int
) -> tuple[ModelConfig, dict]:
    """(cfg, state) padded with zero rows to `vocab_size`, or to the next multiple of `tensor`."""
    if vocab_size is None:
        vocab_size = -(-cfg.vocab_size // tensor) * tensor
    if vocab_size < cfg.vocab_size:
        raise ConversionError(
            f"--vocab-size {vocab_size} is below the Hugging Face model's vocab_size={cfg.vocab_size}; "
            "rows are only added, never dropped"
        )
    return resize_vocabulary(cfg, state, vocab_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_layout(args.tensor, args.pipeline)
        hf_dir = Path(args.hf)
        tokenizer = args.tokenizer or (
            hf_dir / "tokenizer.json" if (hf_dir / "tokenizer.json").is_file() else None
        )
        model_cfg, state = load_hf_directory(hf_dir)
        hf_vocab = model_cfg.vocab_size
        if tokenizer is not None:  # a tokenizer with more ids than the model has rows is another model's
            check_real_vocab_size(load_tokenizer(tokenizer).vocab_size, hf_vocab, f"--tokenizer {tokenizer}")
        model_cfg, state = pad_vocabulary(model_cfg, state, args.vocab_size, args.tensor)
        check_layout(args.tensor, args.pipeline, model_cfg)
        base = load_config(args.config) if args.config else None
        run_cfg = run_config_for(model_cfg, tokenizer, base)
        output = write_model_checkpoint(
            args.output, run_cfg, state, tensor=args.tensor, pipeline=args.pipeline
        )
    except (UserError, OSError) as e:  # config, tokenizer, conversion; unreadable files
        return print_error(e, "convert_from_hf")
    if model_cfg.vocab_size > hf_vocab:
        print(f"padded the vocabulary from {hf_vocab} to {model_cfg.vocab_size} rows (zeros; never sampled)")
    if tokenizer is None:
        print("note: no tokenizer.json in --hf and no --tokenizer given; data.tokenizer is left empty")
    params = sum(t.numel() for t in state.values())
    print(f"wrote {model_cfg.name} ({params:,} parameters) to {output}; continue training with "
          f"--config {output}/config.json train.init_from={output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
