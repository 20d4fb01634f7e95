#!/usr/bin/env python3
"""Make the labelled near-duplicate benchmark from real documents (the embedded Austen corpus).

    python tools/make_neardup_benchmark.py --output bench/neardup.jsonl [--sources 300] [--seed 0]

Each line: {"text", "id", "family", "kind", "edit", "jaccard", "of"}. Sources get 1-3 duplicates
(insertions, deletions, substitutions, reordered paragraphs, added web-site boilerplate, mixed
edits) at a measured word 5-gram Jaccard similarity in --duplicate-range, and sometimes a related
but distinct document (an excerpt among other text, a heavy rewrite, or two different passages
under the same site boilerplate) in --related-range; every other corpus document stays as it is.
Records of one family are near-duplicates of each other; everything else is distinct. Score a
near-dup setting on it with tools/neardup_quality.py. The default output is the shipped benchmark
(deterministic: the same bytes for the same corpus and seed).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from collections import Counter

from megatron_andromeda.errors import report_user_errors
from megatron_andromeda.preprocess.neardup.benchmark import BenchmarkConfig, make_benchmark
from megatron_andromeda.preprocess.report import write_atomic

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data",
                      "corpus", "austen.jsonl.gz")  # fmt: skip


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="benchmark JSONL to write")
    p.add_argument("--corpus", default=CORPUS, help="JSONL(.gz) of real documents with a 'text' field")
    p.add_argument("--sources", type=int, default=BenchmarkConfig.sources, help="documents given variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--duplicate-range", type=_range, default=BenchmarkConfig.duplicate_range, metavar="LOW,HIGH"
    )
    p.add_argument("--related-range", type=_range, default=BenchmarkConfig.related_range, metavar="LOW,HIGH")
    args = p.parse_args(argv)
    try:
        config = BenchmarkConfig(sources=args.sources, seed=args.seed, duplicate_range=args.duplicate_range,
                                 related_range=args.related_range)  # fmt: skip
        opener = gzip.open if args.corpus.endswith(".gz") else open
        with opener(args.corpus, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        records = make_benchmark(texts, config)
    except (OSError, ValueError, KeyError) as e:
        print(f"make_neardup_benchmark.py: error: {e}", file=sys.stderr)
        return 2
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_atomic(args.output, [payload])
    kinds = Counter(r["kind"] for r in records)
    edits = Counter(r["edit"] for r in records if r["edit"])
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(
        f"{args.output}: {len(records)} records ({counts}); sha256 {hashlib.sha256(payload).hexdigest()[:16]}"
    )
    print("  edits: " + ", ".join(f"{e} {n}" for e, n in sorted(edits.items())))
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
