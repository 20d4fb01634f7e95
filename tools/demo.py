#!/usr/bin/env python3
"""`make demo`: the whole path from raw text to a trained, evaluated model, on the CPU in minutes.

1. train a small byte-level BPE tokenizer on the embedded corpus (Jane Austen's six novels);
2. clean, deduplicate, split and tokenize the corpus (four early novels, two late ones) and the
   shipped instruction set (chat template, loss masks) into .bin/.idx datasets;
3. train a tiny PaLM-style model in three stages (examples/configs/demo_tiny.yaml): pretraining,
   continued training, instruction tuning; validation perplexity is printed along the way;
4. evaluate each stage's checkpoint on the same held-out sets (perplexity on the early and late
   novels and on the instruction answers; multiple choice beside its chance level) and print them
   side by side, with a line on why the last stage makes the novels' perplexity rise;
5. continue a prompt with the pretrained checkpoint;
and print how long each step took, in wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from megatron_andromeda.errors import report_user_errors

ROOT = Path(__file__).resolve().parents[1]

CORPUS = ROOT / "examples" / "data" / "corpus" / "austen.jsonl.gz"
INSTRUCTIONS = ROOT / "examples" / "data" / "instructions"
CONFIG = ROOT / "examples" / "configs" / "demo_tiny.yaml"
MC_TASK = INSTRUCTIONS / "austen_novel_mc.jsonl"  # which novel is this passage from? (6 choices)
LATE_NOVELS = ("northanger", "persuasion")


def banner(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tool(*args: str, quiet: bool = False) -> None:
    """Run a tool as a user would; a failure stops the demo with one line (the tool said why above)."""
    code = subprocess.run(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None
    ).returncode
    if code != 0:
        raise SystemExit(f"demo: {args[0]} failed (exit {code}); its message is above")


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


def train(out: Path, tokenizer: Path, steps: int | None) -> list[str]:
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
    labels = [f"{i}-{s.name}" for i, s in enumerate(cfg.stages)]
    print_stage_table(out / "run", labels)
    return labels


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


EVAL_SETS = {  # name in the table -> the validation dataset, under OUT/data
    "early novels": "early_valid_text_document",
    "late novels": "late_valid_text_document",
    "instruction answers": "chat_valid_text_document",  # scored on the replies only (its loss mask)
}
EVAL_MAX_TOKENS = 16384  # per dataset and checkpoint: a stable perplexity at a third of the early set's cost


def evaluate(out: Path, labels: list[str]) -> None:
    """Every stage's checkpoint on the same held-out sets, printed side by side."""
    banner("4/5 evaluate each stage's checkpoint on the same held-out data (tools/evaluate.py)")
    sets = [f"{name.replace(' ', '_')}={out / 'data' / prefix}" for name, prefix in EVAL_SETS.items()]
    for label in labels:
        tool(
            "tools/evaluate.py",
            "--checkpoint",
            str(out / "checkpoints" / label),
            "--valid-data",
            *sets,
            "--tasks",
            f"novel_mc={MC_TASK}",
            "--max-tokens",
            str(EVAL_MAX_TOKENS),
            "--output",
            str(out / "eval" / label),
            quiet=True,  # its tables are in OUT/eval/LABEL.md; the comparison below is the summary
        )
    print_stage_comparison(out, labels)


def print_stage_comparison(out: Path, labels: list[str]) -> None:
    results = {label: json.loads((out / "eval" / f"{label}.json").read_text()) for label in labels}
    ppl = {label: {r["name"]: r["ppl"] for r in res["perplexity"]} for label, res in results.items()}
    mc = {label: next(t for t in res["tasks"] if t["name"] == "novel_mc") for label, res in results.items()}
    chance = 100 * mc[labels[-1]]["chance"]
    width = max(len(label) for label in labels) + 2
    print(f"\n{'after stage':<36}" + "".join(f"{label:>{width}}" for label in labels))
    for name in EVAL_SETS:
        row = "".join(f"{ppl[label][name.replace(' ', '_')]:>{width}.1f}" for label in labels)
        print(f"{'perplexity, ' + name:<36}{row}")
    for metric in ("acc", "acc_norm"):
        row = "".join(
            f"{_pct(mc[label][metric], mc[label][f'{metric}_stderr']):>{width}}" for label in labels
        )
        print(f"{f'novel_mc {metric} % (chance {chance:.1f})':<36}{row}")
    print(
        f"(full tables: {out / 'eval'}/<stage>.md; perplexity on at most {EVAL_MAX_TOKENS:,} tokens per set)"
    )
    print(why_the_last_stage_reads_so(out, ppl, labels))
    note = same_answer_note(mc, labels)
    if note:
        print(note)


def _pct(value: float, stderr: float | None) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def why_the_last_stage_reads_so(out: Path, ppl: dict[str, dict[str, float]], labels: list[str]) -> str:
    """One line on the instruction stage: it trains on the answers alone, so the novels' perplexity
    rises while the answers' falls (forgetting), which a reader would otherwise take for a bug."""
    from megatron_andromeda.data.indexed_dataset import IndexedDataset

    before, after = ppl[labels[-2]], ppl[labels[-1]]
    report = json.loads((out / "run" / labels[-1] / "data_report.json").read_text())
    drawn = sum(s["tokens"] for s in report["sources"])
    passes = drawn / IndexedDataset(out / "data" / "chat_train_text_document").num_tokens
    risen = [f"{n.replace('_', ' ')} {before[n]:.0f} -> {after[n]:.0f}"
             for n in ("early_novels", "late_novels") if after[n] > before[n]]  # fmt: skip
    novels = (
        f"the novels' perplexity rises ({', '.join(risen)}): the tiny model forgets some of their prose "
        "for the chat format (real recipes mix pretraining data into this stage to limit it)"
        if risen
        else "the novels' perplexity does not rise"
    )
    return (
        f"why: the last stage trains on instruction answers only ({passes:.1f} passes over the set, no "
        f"novel text); the answers' perplexity goes {before['instruction_answers']:.0f} -> "
        f"{after['instruction_answers']:.0f} and {novels}."
    )


def same_answer_note(mc: dict[str, dict], labels: list[str]) -> str | None:
    """A model that gives one answer to (nearly) every question scores that answer's share of the
    labels, above chance when the labels are uneven: say so rather than let it pass for knowledge."""
    choices = [json.loads(line)["choices"] for line in MC_TASK.read_text().splitlines()]
    stuck = {}
    for label in labels:
        picks = Counter(choices[i][p["pred"]] for i, p in enumerate(mc[label]["predictions"]))
        answer, count = picks.most_common(1)[0]
        if count >= 0.9 * len(choices):
            stuck[label] = (answer.strip(), count)
    if not stuck:
        return None
    said = ", ".join(f"{label} '{answer}' {count}/{len(choices)}" for label, (answer, count) in stuck.items())
    return (
        f"note: novel_mc answers are nearly constant ({said}): summed log-probabilities favour the shortest "
        "choice, so such an accuracy is the share of questions whose answer it is, not knowledge of the "
        "novels."
    )


def generate(out: Path, prompt: str) -> None:
    banner("5/5 generate: the pretrained checkpoint continues a prompt (tools/generate.py)")
    tool(
        "tools/generate.py",
        "--checkpoint",
        str(out / "checkpoints" / "0-pretrain"),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "60",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--seed",
        "0",
    )


class StepTimes:
    """Wall and CPU seconds (this process and the tools it ran) of each demo step: on a shared
    machine CPU seconds are the comparable figure, wall time depends on the load."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    @staticmethod
    def cpu() -> float:
        own, tools = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + tools.ru_utime + tools.ru_stime

    def run(self, name: str, fn, *args):
        wall, cpu = time.time(), self.cpu()
        result = fn(*args)
        self.rows.append((name, time.time() - wall, self.cpu() - cpu))
        return result

    def report(self) -> str:
        total_wall, total_cpu = sum(r[1] for r in self.rows), sum(r[2] for r in self.rows)
        parts = ", ".join(f"{name} {wall:.0f} s ({cpu:.0f})" for name, wall, cpu in self.rows)
        return f"demo took {total_wall:.0f} s wall, {total_cpu:.0f} CPU s: {parts} (wall s (CPU s))"


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
    times = StepTimes()
    tokenizer = times.run("data", prepare_data, out)
    labels = times.run("training", train, out, tokenizer, args.steps)
    times.run("evaluation", evaluate, out, labels)
    times.run("generation", generate, out, args.prompt)
    print(f"\n\n{times.report()}")
    return 0


if __name__ == "__main__":
    # Before torch loads: OpenMP threads sleep at the end of a parallel region instead of spinning.
    # On a busy machine spinning burnt ~2.7x the CPU time of the same training steps (and more wall
    # time); on an idle one it saves little. The tools the demo runs inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with report_user_errors():
        sys.exit(main())
