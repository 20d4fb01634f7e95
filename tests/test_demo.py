"""`make demo`'s script end to end, with two steps per stage (the real demo trains longer)."""

import subprocess
import sys
from pathlib import Path

from hang_guard import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


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
    for stage in ("0-pretrain", "1-continue", "2-instructions"):
        assert stage in result.stdout
        assert (out / "checkpoints" / stage / "latest").exists()
    assert "| novel_mc | 60 |" in result.stdout  # the evaluation table
    assert (out / "eval.json").exists()
    assert result.stdout.rstrip().splitlines()[-1].startswith("It is a truth universally acknowledged")
