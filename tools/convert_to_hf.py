#!/usr/bin/env python3
"""Export an Andromeda checkpoint as a Hugging Face model directory, exactly, offline, on CPU.

    python tools/convert_to_hf.py --checkpoint runs/x/checkpoints --output hf/x

`--checkpoint` is a checkpoint directory or a save root (its `latest` is used). The output loads
with `transformers.AutoModelForCausalLM.from_pretrained(output)`; the architecture (Cohere,
StableLM, Llama or MPT) follows from the model config, see `megatron_andromeda/hf/convert.py`.
The exported vocabulary is the tokenizer's: padding rows (model.vocab_size above the tokenizer's
size) are dropped, so the Hugging Face model scores and samples as training did. Without a
tokenizer nothing tells padding from real ids, and every row is exported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.errors import UserError, print_error, report_user_errors
from megatron_andromeda.hf import ConversionError, hf_model_type, read_checkpoint, save_hf_directory
from megatron_andromeda.models.vocab import VOCAB_ROWS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or save root")
    p.add_argument("--output", required=True, help="new directory for the Hugging Face model")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the run config's data.tokenizer)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p.parse_args(argv)


def pick_tokenizer(explicit: str | None, recorded: str) -> str | None:
    """--tokenizer wins; else the checkpoint's own when it can be exported; else None, said aloud."""
    if explicit:
        if not Path(explicit).exists():
            raise ConversionError(f"--tokenizer {explicit} does not exist")
        return explicit
    if not recorded:
        reason = "names no tokenizer (data.tokenizer is empty)"
    elif recorded.endswith(".model"):
        reason = f"has a SentencePiece tokenizer ({recorded}), which does not export"
    elif not Path(recorded).is_file():  # a config from a checkpoint: never read a device or FIFO
        reason = f"names the tokenizer {recorded}, which is not a file on this machine"
    else:
        return recorded
    print(
        f"note: the checkpoint {reason}; writing no tokenizer files and keeping every vocabulary row "
        "(padding rows too, which Hugging Face would then sample). Pass --tokenizer PATH (a tokenizer.json)"
    )
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_cfg, state = read_checkpoint(args.checkpoint)
        tokenizer = pick_tokenizer(args.tokenizer, run_cfg.data.tokenizer)
        output = save_hf_directory(
            args.output,
            run_cfg.model,
            state,
            tokenizer=tokenizer,
            dtype=DTYPES.get(args.dtype),
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except (UserError, OSError) as e:  # config, checkpoint, tokenizer, conversion; unreadable files
        return print_error(e, "convert_to_hf")
    model_vocab = run_cfg.model.vocab_size
    dropped = model_vocab - (load_tokenizer(tokenizer).vocab_size if tokenizer else model_vocab)
    if dropped:
        print(f"dropped {dropped} padding rows: the export's vocab_size is the tokenizer's "
              f"{model_vocab - dropped} (model.vocab_size={model_vocab})")  # fmt: skip
    params = sum(t.numel() for t in state.values())
    params -= dropped * sum(state[name].shape[1] for name in VOCAB_ROWS if name in state)
    print(f"wrote a {hf_model_type(run_cfg.model)} model ({params:,} parameters) to {output}")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
