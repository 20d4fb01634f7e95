#!/usr/bin/env python3
"""Check Megatron mmap indexed datasets (.bin/.idx) and print a summary of each.

    python tools/validate_dataset.py data/corpus_text_document [MORE...] [--vocab-size 50304]
    python tools/validate_dataset.py data/corpus_train_text_document.bin --tokenizer tokenizer.json

A dataset is named by its prefix or by its .bin/.idx file. Checks the header, dtype code, index
lengths, pointers against the .bin size, the document index, and (unless --no-token-scan) that every
token id is below the vocabulary: --vocab-size, else the --tokenizer's, else the one the dataset's
preprocessing sidecar records. With --tokenizer, the tokenizer recorded in the sidecar must be that
one (same sha256 and vocabulary size) unless --allow-tokenizer-mismatch. An empty dataset passes
with a warning. Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys

from megatron_andromeda.data.checks import check_tokenizer
from megatron_andromeda.data.indexed_dataset import DatasetError, validate_indexed_dataset
from megatron_andromeda.data.sidecar import find_sidecar
from megatron_andromeda.data.tokenizer import Tokenizer, load_tokenizer
from megatron_andromeda.errors import report_user_errors, traceback_requested

DATASET_FILE_SUFFIXES = (".bin", ".idx")


def dataset_prefix(path: str) -> str:
    """'x_text_document.bin' or '.idx' -> 'x_text_document'; a prefix stays as it is."""
    for suffix in DATASET_FILE_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def check_one(prefix: str, args: argparse.Namespace, tokenizer: Tokenizer | None) -> list[str]:
    """Validate one dataset; prints its summary and returns its warnings (raises DatasetError)."""
    if tokenizer is not None:
        sidecar = check_tokenizer(
            prefix, tokenizer, what="--tokenizer", override="--allow-tokenizer-mismatch",
            allow_mismatch=args.allow_tokenizer_mismatch,
        )  # fmt: skip
    else:
        sidecar = find_sidecar(prefix)
    vocab_size = args.vocab_size
    if vocab_size is None:
        vocab_size = tokenizer.vocab_size if tokenizer else sidecar and sidecar.tokenizer_vocab_size
    summary = validate_indexed_dataset(prefix, vocab_size, check_tokens=not args.no_token_scan)
    where = f"; sidecar {sidecar.path}" if sidecar else ""
    print(f"ok   {summary}{where}")
    if summary.num_documents and summary.num_tokens:
        return []
    origin = f": its sidecar says the run {sidecar.describe_documents()}" if sidecar else ""
    return [f"{prefix} is empty ({summary.num_documents} documents, {summary.num_tokens} tokens){origin}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "prefixes", nargs="+", metavar="PREFIX", help="dataset path, without or with .bin/.idx"
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="token ids must be below this")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer the data must have been made with")
    parser.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="with --tokenizer: warn instead of failing when the sidecar records another tokenizer",
    )
    parser.add_argument("--no-token-scan", action="store_true", help="structure only (fast on huge files)")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    except (OSError, ValueError) as e:
        if traceback_requested():
            raise
        print(f"FAIL --tokenizer: {e}", file=sys.stderr)
        return 1
    failures = 0
    for given in args.prefixes:
        try:
            warnings = check_one(dataset_prefix(given), args, tokenizer)
        except DatasetError as e:
            if traceback_requested():
                raise
            print(f"FAIL {e}", file=sys.stderr)
            failures += 1
        else:
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
