#!/usr/bin/env python3
"""Generate text from an Andromeda checkpoint or a Hugging Face directory, streaming to the terminal.

    python tools/generate.py --checkpoint runs/x/checkpoints --prompt "Once upon a time"
    python tools/generate.py --hf hf/x --prompt "Once" --temperature 0          # greedy
    python tools/generate.py --hf hf/x --prompt "Once" --top-k 50 --top-p 0.9 --seed 7

Both sources run on our own GPTModel with its KV cache (a Hugging Face directory is converted in
memory first), so the two paths produce the same tokens for the same weights. Only ids of the
tokenizer are sampled: rows the model has beyond the tokenizer's vocabulary (padding added for
tensor parallelism) are masked out. Without a tokenizer (`--prompt-ids` alone) that cannot be known,
and every id of the model may come out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_andromeda.config import ConfigError
from megatron_andromeda.data.tokenizer import Tokenizer, load_tokenizer
from megatron_andromeda.errors import UserError, print_error, report_user_errors
from megatron_andromeda.generation import SamplingConfig, generate
from megatron_andromeda.hf import load_hf_directory, read_checkpoint
from megatron_andromeda.models import GPTModel
from megatron_andromeda.models.vocab import check_real_vocab_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Andromeda checkpoint directory or save root")
    source.add_argument("--hf", help="Hugging Face model directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 5,17,42")
    p.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's or the directory's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--no-cache", action="store_true", help="recompute every step (slow; for checking)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def load_model(args: argparse.Namespace) -> tuple[GPTModel, str | None]:
    """The model with its weights, and the tokenizer path to use (None when there is none)."""
    if args.checkpoint:
        run_cfg, state = read_checkpoint(args.checkpoint)
        cfg, tokenizer = run_cfg.model, run_cfg.data.tokenizer or None
    else:
        cfg, state = load_hf_directory(args.hf)
        own = Path(args.hf) / "tokenizer.json"
        tokenizer = str(own) if own.is_file() else None
    model = GPTModel(cfg)
    model.load_state_dict(state)
    return model.eval(), args.tokenizer or tokenizer


class TextStream:
    """Prints generated text as it grows; holds back an incomplete multi-byte character."""

    def __init__(self, tokenizer: Tokenizer | None, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        if self.tokenizer is None:
            self.out.write(f"{self.ids[-1]} ")
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):  # wait for the rest of the character
                return
            self.out.write(text[len(self.printed) :])
            self.printed = text
        self.out.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = _device(args.device)
        model, tokenizer_path = load_model(args)
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        if args.prompt is not None and tokenizer is None:
            raise ConfigError("--prompt needs a tokenizer: pass --tokenizer PATH, or give --prompt-ids")
        real_vocab_size = _real_vocab_size(tokenizer, model.cfg.vocab_size)
        ids = tokenizer.encode(args.prompt) if args.prompt is not None else _parse_ids(args.prompt_ids)
        limit = real_vocab_size or model.cfg.vocab_size
        if not ids or max(ids) >= limit or min(ids) < 0:
            raise ConfigError(f"the prompt must be 1+ token ids in [0, {limit}), got {ids[:8]}")
        eos = None if args.ignore_eos or tokenizer is None else _eod(tokenizer)
        sampling = SamplingConfig(
            args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos
        ).validate()
    except (UserError, OSError, ValueError) as e:  # config, checkpoint, tokenizer, conversion
        return print_error(e, "generate")
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    print(args.prompt if args.prompt is not None else args.prompt_ids + " ", end="", flush=True)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    stream = TextStream(tokenizer)
    generate(model, prompt, sampling, real_vocab_size=real_vocab_size, generator=generator,
             use_cache=not args.no_cache, on_token=stream)  # fmt: skip
    print()
    return 0


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _real_vocab_size(tokenizer: Tokenizer | None, model_vocab_size: int) -> int | None:
    """The tokenizer's vocabulary size (ids above it are padding, never sampled); None without one."""
    if tokenizer is None:
        print(
            f"note: no tokenizer, so padding ids cannot be told apart: all {model_vocab_size} ids of the "
            "model may be sampled; pass --tokenizer to sample the tokenizer's ids only",
            file=sys.stderr,
        )
        return None
    check_real_vocab_size(tokenizer.vocab_size, model_vocab_size, f"tokenizer {tokenizer.path}")
    return tokenizer.vocab_size


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r} must be comma-separated integers") from None
    return ids


def _eod(tokenizer: Tokenizer) -> int | None:
    try:
        return tokenizer.eod_id
    except ValueError:
        return None


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
