#!/usr/bin/env python3
"""Data-index speed against megatron-core, measured in the same run.

    python benchmarks/bench_data_index.py [--peer-python /work/peer-venv/bin/python]

(a) `build_blending_indices` for 20 sources x 100M samples;
(b) random-access fetch of seq-2048 samples from a 3-source blended dataset over synthetic tokens
    (files written once by our writer; megatron-core reads the very same .bin/.idx files).

megatron-core runs in a separate interpreter (`--peer-python`, a venv with megatron-core and its own
torch) on the same files right after ours; without it, only our figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

WEIGHTS = [0.5, 0.3, 0.2]
EOD = 0
DEFAULT_PEER = "/work/peer-venv/bin/python"


def blend_weights(num_sources: int) -> np.ndarray:
    w = np.random.default_rng(0).random(num_sources) + 0.05
    return w / w.sum()


def write_sources(workdir: str, tokens_per_source: int) -> list[str]:
    """Three datasets of lognormal-length documents (mean ~1.4k tokens, like a web corpus)."""
    from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter

    prefixes = []
    for k in range(len(WEIGHTS)):
        prefix = os.path.join(workdir, f"source{k}")
        rng = np.random.default_rng(k)
        lengths = np.maximum(2, rng.lognormal(6.8, 1.0, tokens_per_source // 1000)).astype(np.int64)
        lengths = lengths[np.cumsum(lengths) <= tokens_per_source]
        tokens = rng.integers(1, 50000, int(lengths.sum()), dtype=np.uint16)
        tokens[np.cumsum(lengths) - 1] = EOD
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_documents(np.split(tokens, np.cumsum(lengths)[:-1]))
        prefixes.append(prefix)
    return prefixes


def best_time(fn, repeat: int) -> float:
    """Fastest of `repeat` runs, in seconds: the machine is shared, the minimum is the least noisy."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_fetch(dataset, count: int) -> float:
    """Samples per second over `count` random indices (the page cache is warm: files just written)."""
    order = np.random.default_rng(1).permutation(len(dataset))[:count].tolist()
    for i in order[:200]:
        dataset[i]
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return count / (time.perf_counter() - start)


def run_ours(args, prefixes: list[str]) -> dict[str, float]:
    from megatron_andromeda.data.blended_dataset import BlendedDataset, samples_needed
    from megatron_andromeda.data.gpt_dataset import GPTDataset
    from megatron_andromeda.data.index_helpers import build_blending_indices
    from megatron_andromeda.data.indexed_dataset import IndexedDataset

    blend_s = best_time(
        lambda: build_blending_indices(blend_weights(args.sources), args.blend_size), args.repeat
    )

    needed = samples_needed(WEIGHTS, args.fetch_size)
    sources = []
    for prefix, n in zip(prefixes, needed):
        indexed = IndexedDataset(prefix)
        sources.append(
            GPTDataset(indexed, np.arange(len(indexed)), int(n), args.seq_length, 1234, eod_id=EOD)
        )
    blend = BlendedDataset(sources, WEIGHTS, args.fetch_size)
    return {"blend_s": blend_s, "fetch_per_s": time_fetch(blend, args.fetch_count)}


def run_peer(args, prefixes: list[str], cache_dir: str) -> dict[str, float]:
    """megatron-core's builders on the same inputs (runs inside the peer interpreter)."""
    import logging

    import torch.distributed as dist

    logging.disable(logging.WARNING)
    if not dist.is_initialized():  # megatron-core's builder expects a process group
        dist.init_process_group("gloo", init_method=f"file://{cache_dir}.pg", rank=0, world_size=1)
    from megatron.core.datasets import helpers_cpp
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    start = time.perf_counter()
    dataset_index = np.zeros(args.blend_size, dtype=np.int16)
    dataset_sample_index = np.zeros(args.blend_size, dtype=np.int64)
    weights = blend_weights(args.sources)
    helpers_cpp.build_blending_indices(
        dataset_index, dataset_sample_index, weights, args.sources, args.blend_size, False
    )
    blend_s = time.perf_counter() - start

    class Tokenizer:  # what megatron-core's GPT dataset reads from a tokenizer
        eod, pad, vocab_size = EOD, -1, 50304
        unique_identifiers = {"class": "BenchTokenizer"}

    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=args.seq_length,
        blend=(prefixes, WEIGHTS),
        split="100,0,0",
        path_to_cache=cache_dir,
        tokenizer=Tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train = BlendedMegatronDatasetBuilder(GPTDataset, [args.fetch_size, 0, 0], lambda: True, config).build()[
        0
    ]
    return {
        "blend_s": blend_s,
        "fetch_per_s": time_fetch(train, args.fetch_count),
        "byte_identical": rewrite_matches(prefixes[0], cache_dir + "-rewrite"),
    }


def rewrite_matches(prefix: str, out: str) -> bool:
    """megatron-core's IndexedDatasetBuilder rewrites our dataset; are the files byte-identical?"""
    import filecmp

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    ours = IndexedDataset(prefix)
    builder = IndexedDatasetBuilder(f"{out}.bin", dtype=np.uint16)
    for i in range(len(ours)):
        builder.add_document(torch.from_numpy(ours[i].astype(np.int64)), [int(ours.sequence_lengths[i])])
    builder.finalize(f"{out}.idx")
    return all(filecmp.cmp(f"{prefix}.{ext}", f"{out}.{ext}", shallow=False) for ext in ("bin", "idx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default=DEFAULT_PEER, help="interpreter with megatron-core")
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--blend-size", type=int, default=100_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--fetch-size", type=int, default=60_000, help="samples in the blended dataset")
    parser.add_argument("--fetch-count", type=int, default=30_000, help="random fetches timed")
    parser.add_argument("--tokens-per-source", type=int, default=20_000_000)
    parser.add_argument("--repeat", type=int, default=2, help="blend builds timed (best kept)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--peer-json", default=None, help=argparse.SUPPRESS)  # internal: peer mode
    args = parser.parse_args()

    if args.peer_json:  # we are the peer interpreter
        job = json.loads(args.peer_json)
        print(json.dumps(run_peer(args, job["prefixes"], job["cache_dir"])))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        prefixes = write_sources(workdir, args.tokens_per_source)
        ours = run_ours(args, prefixes)
        peer = None
        if os.path.exists(args.peer_python):
            job = json.dumps({"prefixes": prefixes, "cache_dir": os.path.join(workdir, "peer-cache")})
            cmd = [args.peer_python, os.path.abspath(__file__), "--peer-json", job, *sys.argv[1:]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                peer = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                print(f"peer failed (megatron-core absent?): {done.stderr.strip().splitlines()[-1:]}")
        else:
            print(f"peer absent: no {args.peer_python}; reporting ours only")

    print(f"{'measure':58s} {'ours':>10s} {'mcore':>10s} {'ratio':>7s}")
    rows = [
        (f"build_blending_indices {args.sources} x {args.blend_size:,} (s, lower wins)", "blend_s", True),
        (f"blended GPT fetch, seq {args.seq_length}, random (samples/s)", "fetch_per_s", False),
    ]
    for label, key, lower_is_better in rows:
        if peer is None:
            print(f"{label:58s} {ours[key]:10.3g} {'-':>10s} {'-':>7s}")
            continue
        ratio = peer[key] / ours[key] if lower_is_better else ours[key] / peer[key]
        print(f"{label:58s} {ours[key]:10.3g} {peer[key]:10.3g} {ratio:6.2f}x")
    if peer is not None:
        same = "yes" if peer["byte_identical"] else "NO"
        print(f"megatron-core IndexedDatasetBuilder rewrite of our .bin/.idx byte-identical: {same}")


if __name__ == "__main__":
    main()
