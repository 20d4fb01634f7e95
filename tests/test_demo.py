"""`make demo`'s script end to end, with two steps per stage (the real demo trains longer), and the
closing comparison's wording on made-up results (issue 20 items 8 and 9)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from hang_guard import HANG_GUARD_S
from tool_loader import load_tool

from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["0-pretrain", "1-continue", "2-instructions"]


def test_demo_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "tools/demo.py", "--out", str(out), "--steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.rstrip().splitlines()
    for stage in LABELS:
        assert stage in result.stdout
        assert (out / "checkpoints" / stage / "latest").exists()
        evaluation = json.loads((out / "eval" / f"{stage}.json").read_text())  # every stage evaluated
        assert {r["name"] for r in evaluation["perplexity"]} == {
            "early_novels",
            "late_novels",
            "instruction_answers",
        }
    header = next(i for i, line in enumerate(lines) if line.startswith("after stage"))
    assert lines[header].split()[2:] == LABELS  # the stages side by side
    assert lines[header + 1].startswith("perplexity, early novels") and len(lines[header + 1].split()) == 6
    assert lines[header + 4].startswith("novel_mc acc % (chance 16.7)")  # six choices: 1/6
    assert any(line.startswith("why: the last stage trains on instruction answers only") for line in lines)
    assert any(line.startswith("It is a truth universally acknowledged") for line in lines)
    assert lines[-1].startswith("demo took") and "CPU s" in lines[-1]
    for step in ("data", "training", "evaluation", "generation"):
        assert f"{step} " in lines[-1]


def fake_results(root: Path, ppl: dict[str, list[float]], picks: list[list[int]]) -> None:
    """OUT/eval/<stage>.json with the given perplexities and predictions, and what the note on the
    last stage reads: its data report (12 samples of 16 tokens drawn) and a 64-token chat set."""
    tasks = [json.loads(line) for line in (ROOT / "examples/data/instructions/austen_novel_mc.jsonl").open()]
    for i, label in enumerate(LABELS):
        hits = [p == t["label"] for p, t in zip(picks[i], tasks, strict=True)]
        mc = {"name": "novel_mc", "kind": "multiple_choice", "n": len(tasks), "chance": 1 / 6,
              "acc": float(np.mean(hits)), "acc_stderr": 0.05, "acc_norm": 0.2, "acc_norm_stderr": 0.05,
              "predictions": [{"pred": p} for p in picks[i]]}  # fmt: skip
        result = {"perplexity": [{"name": n, "ppl": v[i]} for n, v in ppl.items()], "tasks": [mc]}
        (root / "eval").mkdir(parents=True, exist_ok=True)
        (root / "eval" / f"{label}.json").write_text(json.dumps(result))
    (root / "run" / LABELS[-1]).mkdir(parents=True)
    (root / "run" / LABELS[-1] / "data_report.json").write_text(json.dumps({"sources": [{"tokens": 192}]}))
    (root / "data").mkdir()
    with IndexedDatasetWriter(root / "data" / "chat_train_text_document", np.uint16) as writer:
        writer.add_document(np.arange(64))


def test_the_comparison_explains_a_rise_and_a_constant_answer(tmp_path, capsys):
    demo = load_tool("demo")
    ppl = {"early_novels": [130.0, 150.0, 284.5], "late_novels": [180.0, 129.0, 300.8],
           "instruction_answers": [400.0, 300.0, 38.7]}  # fmt: skip
    emma = [3] * 60  # ' Emma' every time
    fake_results(tmp_path, ppl, [emma, emma, emma])
    demo.print_stage_comparison(tmp_path, LABELS)
    out = capsys.readouterr().out
    assert "perplexity, early novels" in out and "284.5" in out and "chance 16.7" in out
    assert "3.0 passes over the set" in out  # 192 tokens drawn from a 64-token set
    assert "answers' perplexity goes 300 -> 39" in out
    assert "early novels 150 -> 284, late novels 129 -> 301" in out and "forgets" in out
    assert "'Emma' 60/60" in out and "not knowledge" in out


def test_the_comparison_says_nothing_false_when_nothing_rose(tmp_path, capsys):
    demo = load_tool("demo")
    ppl = {"early_novels": [130.0, 120.0, 110.0], "late_novels": [180.0, 129.0, 128.0],
           "instruction_answers": [400.0, 300.0, 38.7]}  # fmt: skip
    varied = [i % 6 for i in range(60)]
    fake_results(tmp_path, ppl, [varied, varied, varied])
    demo.print_stage_comparison(tmp_path, LABELS)
    out = capsys.readouterr().out
    assert "the novels' perplexity does not rise" in out and "forgets" not in out
    assert "note:" not in out
