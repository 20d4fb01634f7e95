#!/usr/bin/env python3
"""Near-dup across machines (tools/neardup.py): signature speed, clustering memory, quality, N = 1.

    python benchmarks/bench_neardup.py [--cache /work/bench_cache/neardup] [--docs 1000000 10000000]
        [--skip-memory] [--skip-quality] [--skip-shards] [--skip-speed]

1. Signature throughput per core, one process, the same documents, alternating 3 rounds (median):
   the stage's batched MinHash (`MinHasher.signatures` + `band_hashes`, a chunk at a time) against
   today's in-process MinHash (`MinHasher.band_keys` per document, as the preprocessing workers call
   it); outputs checked equal. Both with and without the cleaning that precedes them.
2. Clustering memory: synthetic band keys for N documents (default 1M and 10M, 16 bands, 10% of
   documents near-duplicates of an earlier one, matching it in each band with probability 0.8), laid
   out as signature-stage outputs of 1M-document inputs; then the real bucket tasks and cluster task
   run as processes under a process-tree RSS sampler: peak RSS per N and the growth between them.
3. Quality on the shipped benchmark (tools/make_neardup_benchmark.py defaults): precision / recall /
   F1 at the default settings through the real stages, and today's in-process banding for reference.
4. N shards = 1 shard: the benchmark as 1 file and as 4, near-dup then preprocess_data.py
   --near-dup-dir per shard, merge_datasets.py: drop sets equal, merged datasets byte-identical.
`uptime` is printed beside every figure: the machine is shared.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench_preprocess import timed  # noqa: E402 (process-tree RSS sampler)

CORPUS = os.path.join(REPO, "examples", "data", "corpus", "austen.jsonl.gz")
TOOLS = os.path.join(REPO, "tools")


# Runs a command and prints the largest resident set any of its processes reached (kernel-counted,
# so no peak falls between two samples of the sampler).
_MAXRSS = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)"
)


def max_rss(cmd: list[str], label: str) -> tuple[float, int, str]:
    """(wall seconds, largest RSS of one process of `cmd` in bytes, output)."""
    seconds, _, out, _ = timed([sys.executable, "-c", _MAXRSS, *cmd], label)
    rss = int(next(line for line in out.splitlines() if line.startswith("maxrss")).split()[1])
    return seconds, rss, out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------------- 1. signature speed
def bench_speed(texts: list[str]) -> None:
    from megatron_andromeda.preprocess.cleaning import CleaningConfig
    from megatron_andromeda.preprocess.dedup import MinHasher, band_hashes
    from megatron_andromeda.preprocess.neardup.signatures import document_words
    from megatron_andromeda.preprocess.words import split_words

    hasher = MinHasher(threshold=0.8)
    bands, rows = hasher.bands  # today's in-process banding (9 x 14)
    cleaning = CleaningConfig()
    words = [split_words(t.encode("utf-8"), t.isascii()) for t in texts]
    chunk = 256  # documents per batch, about what a 1 MiB chunk of JSONL holds

    def today(with_cleaning: bool) -> np.ndarray:
        out = []
        for t, w in zip(texts, words):
            if with_cleaning:
                w = document_words((t,), cleaning)
                if isinstance(w, str):
                    continue
            out.append(hasher.band_keys(w))
        return np.stack(out)

    def stage(with_cleaning: bool) -> np.ndarray:
        out = []
        for first in range(0, len(texts), chunk):
            batch = words[first : first + chunk]
            if with_cleaning:
                batch = [document_words((t,), cleaning) for t in texts[first : first + chunk]]
                batch = [w for w in batch if not isinstance(w, str)]
            out.append(band_hashes(hasher.signatures(batch), bands, rows))
        return np.concatenate(out)

    for with_cleaning in (False, True):
        times: dict[str, list[float]] = {"today": [], "stage": []}
        for _ in range(3):
            keys = {}
            for name, fn in (("today", today), ("stage", stage)):
                start = time.process_time()
                keys[name] = fn(with_cleaning)
                times[name].append(time.process_time() - start)
            assert np.array_equal(keys["today"], keys["stage"]), "batched and per-document band keys differ"
        t_today, t_stage = float(np.median(times["today"])), float(np.median(times["stage"]))
        label = "cleaning + MinHash" if with_cleaning else "MinHash only"
        print(f"signatures, {label}, {len(texts)} documents, CPU seconds of one core (median of 3): "
              f"in-process {len(texts) / t_today:,.0f} docs/s, stage {len(texts) / t_stage:,.0f} docs/s, "
              f"ratio {t_today / t_stage:.2f}x  [{uptime()}]", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- 2. clustering memory
def synthetic_run(
    work: str, documents: int, bands: int = 16, per_input: int = 1_000_000, seed: int = 0
) -> str:
    """A near-dup work dir whose signature stage holds synthetic band keys for `documents` documents."""
    from megatron_andromeda.preprocess.neardup.settings import NearDupSettings
    from megatron_andromeda.preprocess.neardup.workdir import init_plan, save_npy, write_marker

    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(-(-documents // per_input)):
        inputs.append(os.path.join(work, f"input{i:04d}.jsonl"))
        open(inputs[-1], "w").close()  # placeholders: the plan lists inputs, the keys are made here
    plan = init_plan(os.path.join(work, "nd"), inputs, NearDupSettings(bands=bands, rows=7, cleaning=None))
    for i, path in enumerate(inputs):
        n = min(per_input, documents - i * per_input)
        keys = rng.integers(0, 2**63, size=(bands, n), dtype=np.uint64)
        dup = np.flatnonzero(rng.random(n) < 0.1)  # 10% copy an earlier document of this input...
        dup = dup[dup > 0]
        source = (rng.random(dup.size) * dup).astype(np.int64)  # ...uniformly among the earlier ones
        for b in range(bands):
            match = rng.random(dup.size) < 0.8
            keys[b, dup[match]] = keys[b, source[match]]
        lines = np.arange(1, n + 1, dtype=np.int64)
        write_marker(plan, "signatures", i, {
            "input": {"path": path, "bytes": 0, "sha256": "synthetic"},
            "documents": {"read": n, "kept": n, "dropped": 0, "malformed": 0}, "dropped": {},
            "outputs": {"keys": save_npy(plan.path("signatures", f"{i:05d}.keys.npy"), keys),
                        "lines": save_npy(plan.path("signatures", f"{i:05d}.lines.npy"), lines)},
            "upstream": None, "seconds": 0.0,
        })  # fmt: skip
    return plan.work_dir


def bench_memory(cache: str, sizes: list[int]) -> None:
    tool = os.path.join(TOOLS, "neardup.py")
    _, base, _ = max_rss([sys.executable, "-c", "import megatron_andromeda.preprocess.neardup.runner"],
                         "interpreter + numpy + package")  # fmt: skip
    peaks = {}
    for n in sizes:
        work = tempfile.mkdtemp(prefix=f"neardup_{n}_", dir=cache)
        print(f"-- {n:,} synthetic documents in {work}", flush=True)
        nd = synthetic_run(work, n)
        _, bucket_rss, _ = max_rss([sys.executable, tool, "buckets", "--work-dir", nd, "--task", "0"],
                                   f"bucket task 0, {n:,} documents")  # fmt: skip
        timed([sys.executable, tool, "buckets", "--work-dir", nd], "remaining bucket tasks")
        seconds, rss, out = max_rss(
            [sys.executable, tool, "cluster", "--work-dir", nd], f"cluster, {n:,} documents"
        )
        with open(os.path.join(nd, "clusters", "report.json")) as f:
            report = json.load(f)
        peaks[n] = rss
        mib = lambda x: f"{x / 2**20:,.0f} MiB"  # noqa: E731
        print(
            f"clustering {n:,} documents ({report['candidate_pairs']:,} candidate pairs, "
            f"{report['documents']['in_clusters']:,} documents in {report['clusters']:,} clusters): "
            f"peak RSS {mib(rss)} ({mib(rss - base)} above the {mib(base)} of the interpreter), "
            f"{seconds:.0f} s; one bucket task {mib(bucket_rss)}  [{uptime()}]",
            flush=True,
        )
        shutil.rmtree(work)
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        per_10m = (peaks[large] - peaks[small]) / (large - small) * 1e7 + base
        print(f"growth {(peaks[large] - base) / max(peaks[small] - base, 1):.1f}x above the interpreter for "
              f"{large / small:.0f}x documents; extrapolated clustering peak per 10M documents "
              f"{per_10m / 2**30:.2f} GiB (target <= 1 GB)  [{uptime()}]")  # fmt: skip


# ------------------------------------------------------------------------------ 3. and 4. benchmark
def make_benchmark_file(cache: str) -> str:
    path = os.path.join(cache, "neardup_benchmark.jsonl")
    if not os.path.exists(path):
        subprocess.run(
            [sys.executable, os.path.join(TOOLS, "make_neardup_benchmark.py"), "--output", path], check=True
        )
    return path


def bench_quality(path: str) -> None:
    from megatron_andromeda.preprocess.neardup.quality import (
        drops_for,
        pipeline_drops,
        read_benchmark,
        score,
        signatures_of,
    )
    from megatron_andromeda.preprocess.neardup.settings import NearDupSettings

    records = read_benchmark(path)
    settings = NearDupSettings()
    with tempfile.TemporaryDirectory() as work:
        s = score(records, pipeline_drops(path, work, settings, workers=2))
    print(
        f"quality, shipped benchmark ({len(records)} records), defaults {settings.bands} x {settings.rows}: "
        f"precision {s.precision:.4f} recall {s.recall:.4f} F1 {s.f1:.4f} (target >= 0.95)  [{uptime()}]"
    )
    index, signatures = signatures_of(records, settings)
    old = score(records, drops_for(index, signatures, 9, 14))
    print(f"   today's in-process banding 9 x 14 (threshold 0.8): precision {old.precision:.4f} "
          f"recall {old.recall:.4f} F1 {old.f1:.4f}")  # fmt: skip


def _tokenizer(texts: list[str], path: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
    return path


def bench_shards(path: str, cache: str, shards: int = 4) -> None:
    work = tempfile.mkdtemp(prefix="neardup_shards_", dir=cache)
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    parts = []
    for s, chunk in enumerate(np.array_split(np.arange(len(lines)), shards)):
        parts.append(os.path.join(work, f"shard{s}.jsonl"))
        with open(parts[-1], "w", encoding="utf-8") as f:
            f.writelines(lines[i] for i in chunk)
    tokenizer = _tokenizer([json.loads(line)["text"] for line in lines[:300]], os.path.join(work, "tok.json"))
    common = ["--tokenizer", tokenizer, "--append-eod", "--split", "90,5,5", "--workers", "1"]

    def tool(name: str, *args: str) -> None:
        subprocess.run([sys.executable, os.path.join(TOOLS, name), *args], check=True, capture_output=True)

    tool("neardup.py", "run", "--input", path, "--work-dir", f"{work}/nd1", "--workers", "2")
    tool("neardup.py", "run", "--input", *parts, "--work-dir", f"{work}/ndN", "--workers", "2")
    drops1 = np.load(f"{work}/nd1/clusters/00000.drop.npy").tolist()  # lines of the one file
    offsets = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(len(lines)), shards)])
    dropsN = [
        int(offsets[s] + x) for s in range(shards) for x in np.load(f"{work}/ndN/clusters/{s:05d}.drop.npy")
    ]
    tool("preprocess_data.py", "--input", path, "--output-prefix", f"{work}/one/corpus",
         "--near-dup-dir", f"{work}/nd1", *common)  # fmt: skip
    for s, part in enumerate(parts):  # one machine per shard
        tool("preprocess_data.py", "--input", part, "--output-prefix", f"{work}/m{s}/corpus",
             "--near-dup-dir", f"{work}/ndN", *common)  # fmt: skip
    tool("merge_datasets.py", "--input", *[f"{work}/m{s}/corpus" for s in range(shards)],
         "--output-prefix", f"{work}/merged/corpus")  # fmt: skip
    same = all(
        filecmp.cmp(f"{work}/one/corpus_{name}.{ext}", f"{work}/merged/corpus_{name}.{ext}", shallow=False)
        for name in ("train_text_document", "valid_text_document", "test_text_document")
        for ext in ("bin", "idx")
    )  # fmt: skip
    print(
        f"{shards} shards vs 1: {len(dropsN)} vs {len(drops1)} documents dropped, same documents: "
        f"{dropsN == drops1}, merged datasets byte-identical to the 1-shard run: {same}  [{uptime()}]"
    )
    shutil.rmtree(work)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/work/bench_cache/neardup")
    p.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    for name in ("speed", "memory", "quality", "shards"):
        p.add_argument(f"--skip-{name}", action="store_true")
    args = p.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    if not args.skip_speed:
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
            bench_speed([json.loads(line)["text"] for line in f])
    if not (args.skip_quality and args.skip_shards):
        path = make_benchmark_file(args.cache)
        if not args.skip_quality:
            bench_quality(path)
        if not args.skip_shards:
            bench_shards(path, args.cache)
    if not args.skip_memory:
        bench_memory(args.cache, sorted(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
