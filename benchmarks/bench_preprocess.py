#!/usr/bin/env python3
"""Preprocessing throughput, output equality and memory against the peer (Megatron-LM's loop).

    python benchmarks/bench_preprocess.py [--cache /work/bench_cache] [--peer-python PYTHON]
        [--workers 2] [--mem-scale 4] [--skip-memory] [--corpus FILE --tokenizer FILE]

Builds (once, cached outside the repository) the reference corpus with
/work/shared/bench/make_corpus.sh and a GPT-NeoX-style tokenizer with train_tokenizer.py, then runs,
each as a separate process under a process-tree RSS sampler:
  1. the peer (`peer_preprocess.py`, megatron-core, `--peer-python` venv), 2 workers;
  2. ours with cleaning, dedup and split off, --append-eod: tokens/s ratio and byte equality;
  3. ours with cleaning and exact dedup on (no near-dup), split off;
  4. ours (as 2) on 1x and `--mem-scale` x the corpus (or its first `--mem-base-mb` MB; hard links
     of one file) for peak memory;
and a MinHash signature micro-benchmark: ours (one-permutation hashing) against datasketch's MinHash.
Ratios are peer time / our time (>= 1 means ours is faster), measured in the same run.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.environ.get("ANDROMEDA_BENCH_DIR", "/work/shared/bench")
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def ensure_inputs(args: argparse.Namespace) -> tuple[str, str]:
    """The corpus and tokenizer, built into the cache directory when missing."""
    os.makedirs(args.cache, exist_ok=True)
    corpus = args.corpus or os.path.join(args.cache, "corpus.jsonl")
    tokenizer = args.tokenizer or os.path.join(args.cache, "tokenizer.json")
    if not os.path.exists(corpus):
        print(f"building the reference corpus into {corpus} (~2 min, apt download)", flush=True)
        work = os.path.join(args.cache, "corpus_work")
        subprocess.run(["bash", os.path.join(BENCH, "make_corpus.sh"), work, corpus + ".part"], check=True)
        os.replace(corpus + ".part", corpus)
    if not os.path.exists(tokenizer):
        print(f"training the tokenizer into {tokenizer}", flush=True)
        script = os.path.join(BENCH, "train_tokenizer.py")
        subprocess.run([sys.executable, script, corpus, tokenizer + ".part.json"], check=True)
        os.replace(tokenizer + ".part.json", tokenizer)
    return corpus, tokenizer


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], label: str) -> tuple[float, int, str, float]:
    """Run `cmd`; (wall seconds, peak process-tree RSS in bytes, stdout, CPU seconds of the process
    tree). CPU seconds are less disturbed than wall time on a shared machine."""
    print(f"-- {label}: {' '.join(cmd)}", flush=True)
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{out}")
    cpu = _children_cpu() - cpu
    print(f"   {seconds:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak[0] / 2**20:.0f} MiB", flush=True)
    return seconds, peak[0], out, cpu


def ours(inputs: list[str], tokenizer: str, prefix: str, workers: int, extra: list[str]) -> list[str]:
    return [sys.executable, TOOL, "--input", *inputs, "--tokenizer", tokenizer, "--output-prefix", prefix,
            "--workers", str(workers), "--append-eod", "--no-split", *extra]  # fmt: skip


def _summary(out: str) -> str:
    """The "read N documents, kept ..." line of our tool's output."""
    return next((line for line in out.splitlines() if line.startswith("read ")), out.strip()[-200:])


def bench_minhash(corpus: str, docs: int = 1500) -> None:
    """Signatures per second: ours (one-permutation hashing) vs datasketch MinHash, same shingles."""
    import json

    from datasketch import MinHash

    from megatron_andromeda.preprocess.dedup import MinHasher
    from megatron_andromeda.preprocess.words import split_words

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(docs), f)]
    words = [split_words(t.encode("utf-8")) for t in texts]
    hasher = MinHasher()
    start = time.perf_counter()
    for w in words:
        hasher.signature(w)
    ours_s = time.perf_counter() - start
    shingles = [w.ngram_hashes(5).tobytes() for w in words]
    start = time.perf_counter()
    for raw in shingles:
        m = MinHash(num_perm=128)
        m.update_batch([raw[i : i + 8] for i in range(0, len(raw), 8)])
    peer_s = time.perf_counter() - start
    print(f"minhash signatures ({docs} docs, word 5-gram shingles hashed once for both):")
    print(f"   ours {docs / ours_s:,.0f} docs/s, datasketch {docs / peer_s:,.0f} docs/s, "
          f"ratio {peer_s / ours_s:.1f}x")  # fmt: skip


def memory_scaling(args: argparse.Namespace, corpus: str, tokenizer: str, work: str) -> None:
    """Peak RSS on 1x and `--mem-scale` x a base corpus (the corpus, or its first `--mem-base-mb` MB)."""
    base = corpus
    if args.mem_base_mb:
        base = os.path.join(work, "base.jsonl")
        with open(corpus, "rb") as src, open(base, "wb") as dst:
            dst.writelines(src.readlines(int(args.mem_base_mb * 1e6)))
    links = []
    for i in range(args.mem_scale):  # hard links: distinct names (not merged as repeats), no extra disk
        links.append(os.path.join(work, f"copy{i}.jsonl"))
        os.link(base, links[-1])
    flags = ["--no-clean", "--no-dedup"]
    _, small_rss, _, _ = timed(
        ours([base], tokenizer, os.path.join(work, "m1"), args.workers, flags), "memory, 1x"
    )
    big_s, big_rss, _, _ = timed(
        ours(links, tokenizer, os.path.join(work, "m4"), args.workers, flags), f"memory, {args.mem_scale}x"
    )
    size = os.path.getsize(base) / 1e6
    mib = 2**20
    print(f"memory: 1x ({size:.0f} MB) {small_rss / mib:.0f} MiB, {args.mem_scale}x {big_rss / mib:.0f} MiB "
          f"(ratio {big_rss / small_rss:.2f}); the {args.mem_scale}x run took {big_s:.1f} s")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/work/bench_cache")
    p.add_argument("--corpus", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mem-scale", type=int, default=4)
    p.add_argument("--mem-base-mb", type=float, default=None, help="memory check on the first N MB only")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the outputs in the work directory")
    args = p.parse_args()
    corpus, tokenizer = ensure_inputs(args)
    work = tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.cache)
    print(f"corpus {corpus} ({os.path.getsize(corpus) / 1e6:.0f} MB), tokenizer {tokenizer}, work dir {work}")

    peer_s = None
    if os.path.exists(args.peer_python):
        peer_cmd = [args.peer_python, os.path.join(BENCH, "peer_preprocess.py"), "--input", corpus,
                    "--tokenizer", tokenizer, "--output-prefix", os.path.join(work, "peer"),
                    "--workers", str(args.workers)]  # fmt: skip
        peer_s, peer_rss, out, peer_cpu = timed(peer_cmd, "peer (megatron-core)")
        print("   " + out.strip().splitlines()[-1])
    else:
        print(f"no peer venv at {args.peer_python}: printing our figures only")

    plain_s, plain_rss, out, plain_cpu = timed(
        ours([corpus], tokenizer, os.path.join(work, "ours"), args.workers, ["--no-clean", "--no-dedup"]),
        "ours, cleaning and dedup off",
    )
    print("   " + _summary(out))
    clean_s, clean_rss, out, clean_cpu = timed(
        ours([corpus], tokenizer, os.path.join(work, "clean"), args.workers, ["--no-near-dedup"]),
        "ours, cleaning + exact dedup",
    )
    print("   " + _summary(out))

    print("\n== results ==")
    if peer_s is not None:
        same = all(
            filecmp.cmp(
                os.path.join(work, f"peer.{ext}"), os.path.join(work, f"ours_text_document.{ext}"), False
            )
            for ext in ("bin", "idx")
        )
        print(f"byte-identical .bin/.idx with the peer: {same}")
        print(f"throughput, cleaning/dedup off: ours {plain_s:.1f} s vs peer {peer_s:.1f} s -> "
              f"{peer_s / plain_s:.2f}x (target >= 1.8x)")  # fmt: skip
        print(
            f"throughput, cleaning + exact dedup: ours {clean_s:.1f} s -> {peer_s / clean_s:.2f}x "
            "(target >= 1.4x)"
        )
        print(
            f"CPU seconds (all processes): peer {peer_cpu:.1f}, ours {plain_cpu:.1f} (plain, "
            f"{peer_cpu / plain_cpu:.2f}x), {clean_cpu:.1f} (clean + exact dedup, "
            f"{peer_cpu / clean_cpu:.2f}x)"
        )
        print(f"peak RSS: peer {peer_rss / 2**20:.0f} MiB, ours {plain_rss / 2**20:.0f} MiB (plain), "
              f"{clean_rss / 2**20:.0f} MiB (clean + dedup)")  # fmt: skip

    if not args.skip_memory:
        memory_scaling(args, corpus, tokenizer, work)
    bench_minhash(corpus)
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
