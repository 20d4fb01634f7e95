#!/usr/bin/env python3
"""`make demo`: the whole path from raw text to a trained, evaluated model, on the CPU in minutes.

1. train a small byte-level BPE tokenizer on the embedded corpus (Jane Austen's six novels);
2. clean, deduplicate, split and tokenize the corpus (four early novels, two late ones) and the
   shipped instruction set (chat template, loss masks) into .bin/.idx datasets;
3. train a tiny PaLM-style model in three stages (examples/configs/demo_tiny.yaml): pretraining,
   continued training, instruction tuning; validation perplexity is printed along the way;
4. evaluate the final checkpoint (perplexity per source, multiple choice) and print the tables;
5. continue a prompt with the trained model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORPUS = ROOT / "examples" / "data" / "corpus" / "austen.jsonl.gz"
INSTRUCTIONS = ROOT / "examples" / "data" / "instructions"
CONFIG = ROOT / "examples" / "configs" / "demo_tiny.yaml"
LATE_NOVELS = ("northanger", "persuasion")


def banner(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def split_corpus(out: Path) -> tuple[Path, Path]:
    """The corpus as two inputs: the four early novels and the two published after Austen's death."""
    early, late = out / "early.jsonl", out / "late.jsonl"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as src, open(early, "w") as e, open(late, "w") as lt:
        for line in src:
            source = json.loads(line).get("source", "")
            (lt if any(name in source for name in LATE_NOVELS) else e).write(line)
    return early, late


def prepare_data(out: Path) -> Path:
    data = out / "data"
    tokenizer = out / "tokenizer.json"
    banner("1/5 tokenizer: byte-level BPE, vocab 4096, on the embedded corpus")
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
    banner("2/5 data: clean, dedup, split and tokenize the novels; template and mask the instructions")
    early, late = split_corpus(out)
    for name, source in (("early", early), ("late", late)):
        tool(
            "tools/preprocess_data.py",
            "--input",
            str(source),
            "--output-prefix",
            str(data / name),
            "--tokenizer",
            str(tokenizer),
            "--split",
            "95,5,0",
            "--append-eod",
            "--workers",
            "2",
        )
    tool(
        "tools/preprocess_chat.py",
        "--input",
        str(INSTRUCTIONS / "austen_instructions.jsonl"),
        "--output-prefix",
        str(data / "chat"),
        "--tokenizer",
        str(tokenizer),
        "--split",
        "90,10,0",
    )
    return tokenizer


def train(out: Path, tokenizer: Path, steps: int | None) -> None:
    from megatron_andromeda.config import load_config
    from megatron_andromeda.train import run

    banner("3/5 train: three stages on the CPU")
    overrides = [
        f"data.tokenizer={tokenizer}",
        f"logging.run_dir={out / 'run'}",
        f"checkpoint.save_dir={out / 'checkpoints'}",
    ]
    cfg = load_config(CONFIG, overrides)
    for stage in cfg.stages:  # the YAML names demo_out/...; follow --out
        stage.train = [_relocate(p, out) for p in stage.train]
        stage.valid = [_relocate(p, out) for p in stage.valid]
        if steps:
            stage.steps = steps
    for previous in (out / "run", out / "checkpoints"):  # every demo run starts fresh
        shutil.rmtree(previous, ignore_errors=True)
    start = time.time()
    run(cfg)
    print(f"\ntraining took {time.time() - start:.0f} s")
    print_stage_table(out / "run", [f"{i}-{s.name}" for i, s in enumerate(cfg.stages)])


def _relocate(path: str, out: Path) -> str:
    return str(out / Path(path).relative_to("demo_out")) if path.startswith("demo_out/") else path


def print_stage_table(run_root: Path, labels: list[str]) -> None:
    print(f"\n{'stage':<16}{'steps':>7}{'tokens':>10}{'valid ppl start':>17}{'valid ppl end':>15}  sources")
    for label in labels:
        records = [json.loads(line) for line in (run_root / label / "metrics.jsonl").read_text().splitlines()]
        valid = [r for r in records if r["kind"] == "valid"]
        train = [r for r in records if r["kind"] == "train"]
        report = json.loads((run_root / label / "data_report.json").read_text())
        sources = ", ".join(
            f"{Path(s['dataset']).name.removesuffix('_text_document')} {s['tokens']:,}"
            for s in report["sources"]
        )
        print(
            f"{label:<16}{train[-1]['step']:>7}{train[-1]['tokens']:>10,}{valid[0]['ppl']:>17.1f}"
            f"{valid[-1]['ppl']:>15.1f}  {sources}"
        )


def evaluate(out: Path) -> None:
    banner("4/5 evaluate the final checkpoint")
    data = out / "data"
    tool(
        "tools/evaluate.py",
        "--checkpoint",
        str(out / "checkpoints" / "2-instructions"),
        "--valid-data",
        f"early={data / 'early_valid_text_document'}",
        f"late={data / 'late_valid_text_document'}",
        "--tasks",
        f"novel_mc={INSTRUCTIONS / 'austen_novel_mc.jsonl'}",
        "--output",
        str(out / "eval"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out", help="working directory for everything the demo writes")
    parser.add_argument("--steps", type=int, default=None, help="override every stage's step count")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_data(out)
    train(out, tokenizer, args.steps)
    evaluate(out)
    banner("5/5 generate")
    tool(
        "tools/generate.py",
        "--checkpoint",
        str(out / "checkpoints" / "0-pretrain"),
        "--prompt",
        args.prompt,
        "--max-new-tokens",
        "60",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--seed",
        "0",
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
