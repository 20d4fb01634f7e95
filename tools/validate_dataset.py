#!/usr/bin/env python3
"""Check Megatron mmap indexed datasets (.bin/.idx) and print a summary of each.

    python tools/validate_dataset.py data/corpus_text_document [MORE_PREFIXES...] [--vocab-size 50304]

Checks the header, dtype code, index lengths, pointers against the .bin size, the document index,
and (unless --no-token-scan) that every token id is below --vocab-size. Exit code 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys

from megatron_andromeda.data.indexed_dataset import DatasetError, validate_indexed_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset path without .bin/.idx")
    parser.add_argument("--vocab-size", type=int, default=None, help="token ids must be below this")
    parser.add_argument("--no-token-scan", action="store_true", help="structure only (fast on huge files)")
    args = parser.parse_args(argv)
    failures = 0
    for prefix in args.prefixes:
        try:
            summary = validate_indexed_dataset(prefix, args.vocab_size, check_tokens=not args.no_token_scan)
        except DatasetError as e:
            print(f"FAIL {e}", file=sys.stderr)
            failures += 1
        else:
            print(f"ok   {summary}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
