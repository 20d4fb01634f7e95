#!/usr/bin/env python3
"""Tokenize instruction / chat data into loss-masked datasets for supervised fine-tuning.

The chat sibling of tools/preprocess_data.py. Inputs are JSONL files (plain, .gz or .zst) in any of
the formats of megatron_andromeda/data/chat_formats.py (oasst1, Dolly, Alpaca, ShareGPT, Anthropic HH,
or our own {"messages": [...]}), detected per record unless --format forces one. Each conversation
is rendered with the chat template and written as two indexed datasets with the same documents:

    PREFIX[_SPLIT]_text_document.{bin,idx}       token ids
    PREFIX[_SPLIT]_lossmask_document.{bin,idx}   1 on assistant replies and their end token

    python tools/preprocess_chat.py --input dolly.jsonl oasst1.jsonl.gz \\
        --tokenizer demo_out/tokenizer.json --output-prefix data/chat --split 95,5,0

A record of no known format stops the run with its file and line. Malformed records (bad JSON, no
assistant reply, unknown speaker...) are skipped, counted and listed; --strict makes them fatal.
Splits are assigned by a hash of each conversation, so they do not depend on file order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from itertools import islice

from megatron_andromeda.data.chat_formats import (
    FORMATS,
    Conversation,
    FormatError,
    ReadReport,
    read_conversations,
)
from megatron_andromeda.data.chat_template import ChatTemplate
from megatron_andromeda.data.sft_dataset import SFTDatasetWriter
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.errors import UserError, print_error, report_user_errors

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(text: str | None) -> list[float] | None:
    """'95,5,0' -> cumulative fractions [0.95, 1.0, 1.0]; None keeps one unsplit dataset."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--split {text!r}: expected up to three comma-separated numbers like 95,5,0"
        ) from None
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--split {text!r}: expected 1-3 non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total, cumulative, acc = sum(weights), [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    cumulative[-1] = 1.0
    return cumulative


def split_of(conversation: Conversation, cumulative: list[float]) -> int:
    """A stable split index from a hash of the conversation's content."""
    digest = hashlib.sha1(json.dumps(conversation, sort_keys=True).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return next(i for i, edge in enumerate(cumulative) if u < edge)


def batched(items: Iterator[Conversation], size: int) -> Iterator[list[Conversation]]:
    while batch := list(islice(items, size)):
        yield batch


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    fmt: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    strict: bool = False,
) -> tuple[list[ReadReport], dict[str, SFTDatasetWriter]]:
    """Read, render, tokenize and write; returns the per-file reports and the finished writers.

    With `strict`, any malformed record raises FormatError and nothing is written.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    cumulative = parse_split(split)
    names = [""] if cumulative is None else [f"_{n}" for n in SPLIT_NAMES]
    writers = {name: SFTDatasetWriter(f"{output_prefix}{name}", tokenizer.vocab_size) for name in names}
    template, reports = ChatTemplate(), []
    try:
        for path in inputs:
            report = ReadReport(str(path))
            reports.append(report)
            for batch in batched(read_conversations(path, fmt, report), batch_size):
                for conversation, (ids, mask) in zip(batch, template.encode_many(batch, tokenizer)):
                    name = names[0] if cumulative is None else names[split_of(conversation, cumulative)]
                    writers[name].add(ids, mask)
            if strict and report.malformed:
                raise FormatError(f"--strict: malformed records\n{report.summary()}")
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.finalize()
    return reports, writers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)"
    )
    parser.add_argument(
        "--output-prefix", required=True, help="datasets are written as PREFIX[_SPLIT]_*_document"
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    parser.add_argument(
        "--format", choices=("auto", *FORMATS), default="auto", help="force one record format"
    )
    parser.add_argument(
        "--split", default=None, help="train,valid,test weights, e.g. 95,5,0 (default: no split)"
    )
    parser.add_argument("--strict", action="store_true", help="fail when any record is malformed")
    parser.add_argument("--batch-size", type=int, default=256, help="conversations per tokenizer call")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    fmt = None if args.format == "auto" else args.format
    try:
        reports, writers = preprocess(
            args.input, args.output_prefix, args.tokenizer, fmt, args.split, args.batch_size, args.strict
        )
    except (UserError, ValueError, FileNotFoundError) as e:  # records, tokenizer, flags, files
        return print_error(e, "preprocess_chat")
    for report in reports:
        print(report.summary())
    for name, w in writers.items():
        share = w.num_trained / max(w.num_tokens, 1)
        print(
            f"{args.output_prefix}{name}: {w.num_conversations} conversations, {w.num_tokens} tokens, "
            f"{w.num_trained} trained ({100 * share:.1f}%)"
        )
    malformed = sum(len(r.malformed) for r in reports)
    print(f"done in {time.perf_counter() - start:.1f} s; {malformed} malformed records skipped")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
