#!/usr/bin/env python3
"""Rewrite a checkpoint for another tensor x pipeline layout, offline on CPU.

    python tools/reshard_checkpoint.py --input ckpt/run --output ckpt/run-tp4 --tensor 4 --pipeline 2
    torchrun --nproc-per-node 8 -m megatron_andromeda.train ... checkpoint.load_dir=ckpt/run-tp4

`--input` is a save root (its `latest` is used) or one checkpoint directory; `--output` is a new
save root that receives `step_XXXXXXXX/` and `latest`. Weights and optimizer state (Adam moments,
fp32 masters; `--model-only` drops them) are cut for the new layout; the data-parallel degree and
the distributed optimizer are chosen when loading, which cuts ZeRO-1 fragments for any degree.
Training resumes from the output at the same step and data position; random states belong to the
old layout's ranks and restart from the seed.

Any layout already loads any checkpoint directly: resharding offline saves each rank of a large
run from slicing many files, and `--tensor 1 --pipeline 1` consolidates a run into one file.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_andromeda.checkpoint import open_checkpoint, reshard_checkpoint
from megatron_andromeda.errors import UserError, print_error, report_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="save root or checkpoint directory to read")
    p.add_argument("--output", required=True, help="new save root to write (step_XXXXXXXX/ and latest)")
    p.add_argument("--tensor", type=int, required=True, help="tensor-parallel degree of the output")
    p.add_argument("--pipeline", type=int, required=True, help="pipeline-parallel degree of the output")
    p.add_argument("--model-only", action="store_true", help="leave the optimizer state out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        source = open_checkpoint(args.input)
        layout = source.metadata["layout"]
        written = reshard_checkpoint(
            source.path, args.output, args.tensor, args.pipeline, with_optimizer=not args.model_only
        )
    except (UserError, OSError) as e:
        return print_error(e, "reshard_checkpoint")
    print(
        f"{source.path} (tensor {layout['tensor']} x pipeline {layout['pipeline']} x data {layout['data']}) "
        f"-> {written} (tensor {args.tensor} x pipeline {args.pipeline}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
