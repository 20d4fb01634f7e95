"""tools/plot_metrics.py: loss and throughput curves from metrics.jsonl into a PNG."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run_dir: Path, steps: int = 20, speed: float = 1000.0, trailing: str = "") -> Path:
    """A metrics.jsonl as the trainer writes it: valid at 0 and every 10 steps, train every 5."""
    run_dir.mkdir(parents=True)
    records = [{"kind": "valid", "step": 0, "time": 0.0, "loss": 9.0, "ppl": 8103.1}]
    for step in range(5, steps + 1, 5):
        records.append(
            {
                "kind": "train",
                "step": step,
                "loss": 9.0 - step / 10,
                "lr": 1e-3,
                "tokens_per_s": speed + step,
                "mfu": None,
            }
        )
        if step % 10 == 0:
            records.append({"kind": "valid", "step": step, "loss": 9.1 - step / 10, "ppl": 1.0})
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + trailing)
    return path


def test_plot_writes_png_with_expected_curves(tmp_path, tool, capsys):
    a = write_run(tmp_path / "run_a")
    b = write_run(tmp_path / "run_b", speed=2000.0)
    runs = {"a": tool.read_metrics(a), "b": tool.read_metrics(b)}
    fig = tool.plot_metrics(runs, title="demo")
    loss_ax, speed_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["a train", "a valid", "b train", "b valid"]
    assert len(speed_ax.lines) == 2
    train = loss_ax.lines[0]
    assert list(train.get_xdata()) == [5, 10, 15, 20] and list(train.get_ydata()) == [8.5, 8.0, 7.5, 7.0]
    assert list(loss_ax.lines[1].get_xdata()) == [0, 10, 20]
    assert list(speed_ax.lines[1].get_ydata()) == [2005.0, 2010.0, 2015.0, 2020.0]

    out = tmp_path / "plots" / "curves.png"
    assert tool.main(["--metrics", str(a), f"b={b}", "--output", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert "(6 curves)" in capsys.readouterr().out
    assert not list(out.parent.glob(".*tmp*"))  # written atomically


def test_half_written_last_line_is_skipped_with_a_warning(tmp_path, tool, capsys):
    path = write_run(tmp_path / "live", trailing='{"kind": "train", "st')
    records = tool.read_metrics(path)
    assert len(records) == 7 and "live/metrics.jsonl:8: incomplete last line" in capsys.readouterr().err


def test_bad_line_names_file_and_line(tmp_path, tool, capsys):
    path = write_run(tmp_path / "bad")
    lines = path.read_text().splitlines()
    lines[2] = "not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: invalid JSON"):
        tool.read_metrics(path)
    assert tool.main(["--metrics", str(path), "--output", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:3" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
