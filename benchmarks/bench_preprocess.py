#!/usr/bin/env python3
"""Preprocessing throughput, output equality and memory against the peer (Megatron-LM's loop).

    python benchmarks/bench_preprocess.py [--cache /work/bench_data] [--peer-python PYTHON]
        [--workers N] [--peer-workers 2] [--mem-scale 4] [--skip-memory] [--skip-baseline]
        [--baseline-rev REV] [--skip-minhash] [--corpus FILE --tokenizer FILE]

Builds (once, cached outside the repository) the reference corpus with
/work/shared/bench/make_corpus.sh and a GPT-NeoX-style tokenizer with train_tokenizer.py, then runs,
each as a separate process under a process-tree RSS sampler, all in one run on one machine:
  1. the peer (`peer_preprocess.py`, megatron-core, `--peer-python` venv), `--peer-workers` workers;
  2. the floor: gigatoken alone encoding the corpus texts already in memory (one `encode_batch`
     call, its default thread pool; the process's loading is not timed);
  3. ours with cleaning, dedup and split off, --append-eod, default workers (`--workers` to pin):
     ratio to the peer (target >= 5x), to the floor (target <= 1.5x) and byte equality;
  4. ours with cleaning and exact dedup on (no near-dup), split off: ratio to the peer (>= 3x);
  5. without gigatoken (its import blocked): ours as 3 and 4, against the pipeline of
     `--baseline-rev` (default: the merge base with main) run from a `git archive` copy, so that
     "nothing gets slower without gigatoken" is measured, not assumed;
  6. ours (as 3) on 1x and `--mem-scale` x the corpus (hard links of one file) for peak memory;
and a MinHash signature micro-benchmark: ours (one-permutation hashing) against datasketch's MinHash.
Every figure is printed with the machine's load average when it was taken; ratios compare runs of
the same invocation (peer time / our time, >= 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import filecmp
import json
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
PLAIN = ["--no-clean", "--no-dedup"]
CLEAN = ["--no-near-dedup"]
# Runs the tool with `import gigatoken` failing, as on an install without the [fast] extra.
WITHOUT_GIGATOKEN = (
    "import runpy, sys; sys.modules['gigatoken'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def load() -> str:
    """The machine's 1-, 5- and 15-minute load averages (what `uptime` prints)."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


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


class Timing:
    """One timed process: wall and CPU seconds of the process tree, peak RSS, output, load."""

    def __init__(self, label: str, cmd: list[str], env: dict | None = None) -> None:
        print(f"-- {label}: {' '.join(cmd)}", flush=True)
        cpu = _children_cpu()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        self.out, _ = proc.communicate()
        self.seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed ({proc.returncode}):\n{self.out}")
        self.cpu = _children_cpu() - cpu
        self.rss = peak[0]
        self.load = load()
        print(f"   {self.seconds:.2f} s wall, {self.cpu:.2f} s CPU, peak RSS {self.rss / 2**20:.0f} MiB "
              f"({self.load})", flush=True)  # fmt: skip
        for line in self.out.splitlines():
            if line.startswith(
                ("[preprocess] tokenizer backend", "[preprocess] execution", "read ", "peer:")
            ):
                print("   " + line[:220], flush=True)


def ours(
    inputs: list[str], tokenizer: str, prefix: str, args: argparse.Namespace, extra: list[str]
) -> list[str]:
    workers = ["--workers", str(args.workers)] if args.workers is not None else []
    return [TOOL, "--input", *inputs, "--tokenizer", tokenizer, "--output-prefix", prefix,
            *workers, "--append-eod", "--no-split", *extra]  # fmt: skip


def same_dataset(a: str, b: str) -> bool:
    return all(filecmp.cmp(f"{a}.{ext}", f"{b}.{ext}", shallow=False) for ext in ("bin", "idx"))


def floor_main(corpus: str, tokenizer: str) -> None:
    """(hidden `--floor` mode) gigatoken alone: encode every text of the corpus, already in memory;
    prints the seconds and the CPU seconds (all threads) of that one call."""
    import gigatoken

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = gigatoken.Tokenizer(tokenizer)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    ids = tok.encode_batch(texts)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds, "tokens": int(len(ids.layout.content))}))


def baseline_tool(args: argparse.Namespace, work: str) -> tuple[str, str] | None:
    """(tools/preprocess_data.py, PYTHONPATH) of `--baseline-rev`, exported with `git archive`, with
    this checkout's built C++ extension (the baseline's csrc is the same or older)."""
    rev = args.baseline_rev
    try:
        if rev is None:
            rev = subprocess.run(["git", "-C", REPO, "merge-base", "HEAD", "main"], check=True,
                                 capture_output=True, text=True).stdout.strip()  # fmt: skip
        root = os.path.join(work, "baseline")
        os.makedirs(root)
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "megatron_andromeda", "tools"],
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"no baseline ({e}); skipping the comparison without gigatoken")
        return None
    helpers = os.path.join(REPO, "megatron_andromeda", "data")
    for name in os.listdir(helpers):
        if name.startswith("_helpers") and name.endswith(".so"):
            shutil.copy(os.path.join(helpers, name), os.path.join(root, "megatron_andromeda", "data", name))
    print(f"baseline: {rev[:12]} exported to {root}")
    return os.path.join(root, "tools", "preprocess_data.py"), root


def without_gigatoken(args: argparse.Namespace, corpus: str, tokenizer: str, work: str) -> list[str]:
    """Ours with gigatoken blocked against the baseline revision, plain and with cleaning + dedup."""
    found = baseline_tool(args, work)
    if found is None:
        return []
    tool, pythonpath = found
    lines = []
    for name, flags in (("cleaning/dedup off", PLAIN), ("cleaning + exact dedup", CLEAN)):
        cmd = ours([corpus], tokenizer, os.path.join(work, f"nogt_{len(lines)}"), args, flags)
        mine = Timing(f"ours without gigatoken, {name}", [sys.executable, "-c", WITHOUT_GIGATOKEN, *cmd])
        cmd = ours([corpus], tokenizer, os.path.join(work, f"base_{len(lines)}"), args, flags)
        cmd[0] = tool
        env = {**os.environ, "PYTHONPATH": pythonpath}
        base = Timing(f"baseline {name}", [sys.executable, *cmd], env=env)
        lines.append(
            f"without gigatoken, {name}: ours {mine.seconds:.1f} s vs baseline {base.seconds:.1f} s -> "
            f"{base.seconds / mine.seconds:.2f}x wall, {base.cpu / mine.cpu:.2f}x CPU (target >= 1) "
            f"[{mine.load}]"
        )
    return lines


def bench_minhash(corpus: str, docs: int = 1500) -> None:
    """Signatures per second: ours (one-permutation hashing) vs datasketch MinHash, same shingles."""
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
          f"ratio {peer_s / ours_s:.1f}x [{load()}]")  # fmt: skip


def memory_scaling(args: argparse.Namespace, corpus: str, tokenizer: str, work: str) -> str:
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
    small = Timing(
        "memory, 1x", [sys.executable, *ours([base], tokenizer, os.path.join(work, "m1"), args, PLAIN)]
    )
    big = Timing(
        f"memory, {args.mem_scale}x",
        [sys.executable, *ours(links, tokenizer, os.path.join(work, "m4"), args, PLAIN)],
    )
    size, mib = os.path.getsize(base) / 1e6, 2**20
    return (
        f"memory: 1x ({size:.0f} MB) {small.rss / mib:.0f} MiB, {args.mem_scale}x {big.rss / mib:.0f} "
        f"MiB (ratio {big.rss / small.rss:.2f}, target <= 1.2); the {args.mem_scale}x run took "
        f"{big.seconds:.1f} s [{big.load}]"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/work/bench_data", help="where the corpus and tokenizer are kept")
    p.add_argument("--corpus", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--peer-python", default="/work/bench_data/peer_venv/bin/python")
    p.add_argument("--peer-workers", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="ours: default = the tool's own default")
    p.add_argument("--mem-scale", type=int, default=4)
    p.add_argument("--mem-base-mb", type=float, default=None, help="memory check on the first N MB only")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-baseline", action="store_true", help="no runs without gigatoken")
    p.add_argument(
        "--baseline-rev", default=None, help="git revision of 'today' (default: merge base with main)"
    )
    p.add_argument("--skip-minhash", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the outputs in the work directory")
    p.add_argument("--floor", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    return p.parse_args()


def headline(peer: Timing | None, floor: Timing, plain: Timing, clean: Timing, work: str) -> list[str]:
    """The ratios the targets are about, each with the load when it was measured."""
    measured = json.loads(floor.out.strip().splitlines()[-1])
    floor_s, floor_cpu = measured["seconds"], measured["cpu"]
    with open(os.path.join(work, "ours.json")) as f:
        in_run = json.load(f)["seconds"]
    lines = [
        f"floor: gigatoken encode_batch of the texts in memory {floor_s:.2f} s, {floor_cpu:.2f} s CPU "
        f"[{floor.load}]",
        f"cleaning/dedup off vs floor: ours {plain.seconds:.2f} s whole process ({in_run:.2f} s inside "
        f"run()) -> {plain.seconds / floor_s:.2f}x the floor (target <= 1.5x); CPU {plain.cpu:.2f} s -> "
        f"{plain.cpu / floor_cpu:.2f}x the floor's [{plain.load}]",
    ]
    if peer is None:
        return lines
    same = same_dataset(os.path.join(work, "peer"), os.path.join(work, "ours_text_document"))
    return lines + [
        f"byte-identical .bin/.idx with the peer: {same}",
        f"cleaning/dedup off vs peer: ours {plain.seconds:.2f} s vs peer {peer.seconds:.2f} s -> "
        f"{peer.seconds / plain.seconds:.2f}x (target >= 5x); CPU {peer.cpu / plain.cpu:.2f}x [{plain.load}]",
        f"cleaning + exact dedup vs peer: ours {clean.seconds:.2f} s -> {peer.seconds / clean.seconds:.2f}x "
        f"(target >= 3x); CPU {peer.cpu / clean.cpu:.2f}x [{clean.load}]",
        f"CPU seconds (all processes): peer {peer.cpu:.1f}, floor process {floor.cpu:.1f}, ours "
        f"{plain.cpu:.1f} (plain), {clean.cpu:.1f} (clean + exact dedup)",
        f"peak RSS: peer {peer.rss / 2**20:.0f} MiB, ours {plain.rss / 2**20:.0f} MiB (plain), "
        f"{clean.rss / 2**20:.0f} MiB (clean + dedup)",
    ]


def main() -> int:
    args = parse_args()
    if args.floor:
        floor_main(*args.floor)
        return 0
    corpus, tokenizer = ensure_inputs(args)
    work = tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.cache)
    print(f"corpus {corpus} ({os.path.getsize(corpus) / 1e6:.0f} MB), tokenizer {tokenizer}, work dir {work}")
    print(f"machine: {os.cpu_count()} cores, {load()}", flush=True)
    peer = None
    if os.path.exists(args.peer_python):
        script = os.path.join(BENCH, "peer_preprocess.py")
        peer = Timing("peer (megatron-core)", [
            args.peer_python, script, "--input", corpus, "--tokenizer", tokenizer,
            "--output-prefix", os.path.join(work, "peer"), "--workers", str(args.peer_workers),
        ])  # fmt: skip
    else:
        print(f"no peer venv at {args.peer_python}: printing our figures only")
    floor = Timing(
        "floor: gigatoken alone, texts in memory", [sys.executable, __file__, "--floor", corpus, tokenizer]
    )
    plain_cmd = ours([corpus], tokenizer, os.path.join(work, "ours"), args, PLAIN)
    plain = Timing("ours, cleaning and dedup off", [sys.executable, *plain_cmd])
    clean_cmd = ours([corpus], tokenizer, os.path.join(work, "clean"), args, CLEAN)
    clean = Timing("ours, cleaning + exact dedup", [sys.executable, *clean_cmd])
    results = headline(peer, floor, plain, clean, work)
    if not args.skip_baseline:
        results += without_gigatoken(args, corpus, tokenizer, work)
    if not args.skip_memory:
        results.append(memory_scaling(args, corpus, tokenizer, work))
    print("\n== results ==")
    print("\n".join(results), flush=True)
    if not args.skip_minhash:
        bench_minhash(corpus)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
