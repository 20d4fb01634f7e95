#!/usr/bin/env python3
"""Merge preprocessing runs (one per machine, say) or plain Megatron datasets into one.

    # runs: each machine ran tools/preprocess_data.py on its share of the files
    python tools/merge_datasets.py --input out/part0 out/part1 out/part2 --output-prefix out/corpus
    # plain .bin/.idx datasets, concatenated in the order given
    python tools/merge_datasets.py --datasets a_text_document b_text_document --output-prefix ab_text_document

With runs, every split and key is merged (out/corpus_train_text_document, ...) and out/corpus.json
holds the summed counts and the runs it came from. Runs made with exact dedup (the default) are also
deduplicated against each other, in the order given; near-duplicates only within each run, unless the
runs applied one tools/neardup.py run's drop lists (--near-dup-dir), which span all of its inputs
(`dedup_scope` in the sidecar). The runs must share tokenizer, dtype, keys, split, EOD setting and
near-dup run.
"""

from __future__ import annotations

import argparse
import sys

from megatron_andromeda.errors import UserError, print_error, report_user_errors
from megatron_andromeda.preprocess.merge import merge_datasets, merge_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument(
        "--input",
        nargs="+",
        metavar="RUN_PREFIX",
        help="--output-prefix of preprocess_data.py runs (PREFIX or PREFIX.json)",
    )
    sources.add_argument("--datasets", nargs="+", metavar="PREFIX", help="plain datasets (no .bin/.idx)")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)  # fmt: skip
    try:
        if args.input:
            runs = [p[: -len(".json")] if p.endswith(".json") else p for p in args.input]
            sidecar = merge_runs(runs, args.output_prefix)
            for name, out in sidecar["outputs"].items():
                print(f"{out['prefix']}: {out['documents']:,} documents, {out['tokens']:,} tokens ({name})")
            print(f"sidecar: {args.output_prefix}.json (merged from {len(runs)} runs)")
        else:
            merged = merge_datasets(args.datasets, args.output_prefix)
            print(f"{args.output_prefix}: {merged.num_documents:,} documents, {merged.num_tokens:,} tokens")
    except (UserError, ValueError) as e:
        return print_error(e, "merge_datasets.py")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
