#!/usr/bin/env python3
"""`make demo`: the whole path from raw text to a trained model, on the CPU in a few minutes.

1. train a small byte-level BPE tokenizer on the embedded corpus (Jane Austen's novels);
2. clean, deduplicate, split and tokenize the corpus into .bin/.idx datasets;
3. train a tiny PaLM-style model (examples/configs/demo_tiny.yaml), printing validation
   perplexity at the start and at the end;
4. continue a prompt with the trained model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = ROOT / "examples" / "data" / "corpus" / "austen.jsonl.gz"
CONFIG = ROOT / "examples" / "configs" / "demo_tiny.yaml"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out", help="working directory for everything the demo writes")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / "tokenizer.json"
    prefix = out / "data" / "austen"

    step("1/4 tokenizer: byte-level BPE, vocab 4096, on the embedded corpus")
    if not tokenizer.exists():
        tool(
            "tools/train_tokenizer.py",
            "--input",
            str(CORPUS),
            "--output",
            str(tokenizer),
            "--vocab-size",
            "4096",
        )

    step("2/4 data: clean, dedup, split 95/5/0, tokenize")
    tool(
        "tools/preprocess_data.py",
        "--input",
        str(CORPUS),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer),
        "--split",
        "95,5,0",
        "--append-eod",
        "--workers",
        "2",
    )

    step("3/4 train a tiny PaLM-style model on the CPU")
    from megatron_andromeda.config import load_config
    from megatron_andromeda.train import run

    overrides = [
        f"data.tokenizer={tokenizer}",
        f"data.train=[{prefix}_train_text_document]",
        f"data.valid=[{prefix}_valid_text_document]",
        f"logging.run_dir={out / 'run'}",
        f"checkpoint.save_dir={out / 'checkpoints'}",
    ]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(CONFIG, overrides)
    for previous in (out / "run", out / "checkpoints"):  # every demo run starts fresh
        shutil.rmtree(previous, ignore_errors=True)
    start = time.time()
    run(cfg)
    records = (out / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in records if '"valid"' in line]
    first, last = evals[0], evals[-1]
    print(
        f"\nvalidation perplexity: {first['ppl']:.1f} at step {first['step']} -> {last['ppl']:.1f} at step "
        f"{last['step']} ({time.time() - start:.0f} s of training)"
    )

    step("4/4 generate")
    tool("tools/generate.py", "--checkpoint", str(out / "checkpoints"), "--prompt", args.prompt,
         "--max-new-tokens", "60", "--temperature", "0.8", "--top-k", "40", "--seed", "0")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
