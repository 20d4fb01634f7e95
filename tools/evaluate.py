#!/usr/bin/env python3
"""Evaluate a checkpoint on local task files and held-out datasets; write JSON and a Markdown table.

    python tools/evaluate.py --checkpoint runs/x/checkpoints \\
        --tasks examples/data/instructions/austen_novel_mc.jsonl piqa=data/piqa_valid.jsonl \\
        --valid-data data/austen_valid_text_document --output runs/x/eval

Tasks are JSONL files, named after the file or `NAME=PATH`: multiple choice (our
{"context", "choices", "label"} or PIQA / HellaSwag / ARC / BoolQ records) or generation
({"context", "answers"}). `--valid-data` prefixes get perplexity per source and split (a chat
dataset from tools/preprocess_chat.py is scored on its assistant replies). A dataset whose sidecar
records another tokenizer than the checkpoint's (or --tokenizer) is refused unless
--allow-tokenizer-mismatch. Nothing is downloaded.
Writes OUTPUT.json (metrics and every prediction) and OUTPUT.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron_andromeda.checkpoint import resolve_checkpoint
from megatron_andromeda.errors import UserError, print_error, report_user_errors
from megatron_andromeda.evaluation.runner import evaluate, markdown_report
from megatron_andromeda.evaluation.scoring import load_eval_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or save root")
    p.add_argument("--tasks", nargs="*", default=[], help="task JSONL files ([NAME=]PATH)")
    p.add_argument("--valid-data", nargs="*", default=[], help="dataset prefixes ([NAME=]PREFIX)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one in the checkpoint's config)")
    p.add_argument("--seq-length", type=int, default=None, help="perplexity window (default: model maximum)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens per dataset")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit for generation tasks")
    p.add_argument("--chat", action="store_true", help="ask generation tasks through the chat template")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="score --valid-data whose sidecar records another tokenizer (a warning instead of an error)",
    )
    p.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.md (default: print only)")
    return p.parse_args(argv)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tasks and not args.valid_data:
        print("error: give --tasks and/or --valid-data", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        em = load_eval_model(args.checkpoint, args.tokenizer, args.device, args.batch_size)
        results = evaluate(
            em,
            args.tasks,
            args.valid_data,
            args.seq_length,
            args.max_tokens,
            args.limit,
            args.max_new_tokens,
            args.chat,
            args.allow_tokenizer_mismatch,
        )
    except (UserError, FileNotFoundError, ValueError) as e:  # tasks, data, checkpoint, tokenizer
        return print_error(e, "evaluate")
    results = {
        "checkpoint": str(resolve_checkpoint(args.checkpoint)),
        "seconds": round(time.perf_counter() - start, 2),
        **results,
    }
    table = markdown_report(results)
    print(table, end="")
    if args.output:
        write_atomic(Path(f"{args.output}.json"), json.dumps(results, indent=2) + "\n")
        write_atomic(Path(f"{args.output}.md"), f"Evaluation of `{results['checkpoint']}`\n\n{table}")
        print(f"wrote {args.output}.json and {args.output}.md")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
