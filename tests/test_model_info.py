"""tools/model_info.py: the memory table follows the precision the config trains in (issue 20 item 10)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tool_loader import load_tool

from megatron_andromeda.config import load_config
from megatron_andromeda.models.accounting import count_parameters, training_memory
from megatron_andromeda.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
DEMO = "examples/configs/demo_tiny.yaml"  # train.precision: fp32


@pytest.mark.parametrize(("precision", "weight", "master"), [("fp32", 4, 0), ("bf16", 2, 4), ("fp16", 2, 4)])
def test_state_bytes_per_parameter(precision, weight, master):
    cfg = get_preset("andromeda-100m")
    n = count_parameters(cfg).total
    memory = training_memory(cfg, precision=precision)
    assert (memory.weights, memory.master_weights) == (weight * n, master * n)
    assert (memory.gradients, memory.optimizer_states) == (4 * n, 8 * n)
    sharded = training_memory(cfg, data_parallel=4, distributed_optimizer=True, precision=precision)
    assert sharded.master_weights == master * n // 4 and sharded.weights == weight * n


def test_cli_labels_an_fp32_config_fp32():
    assert load_config(ROOT / DEMO).train.precision == "fp32"
    cmd = [sys.executable, "tools/model_info.py", "--config", DEMO]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split("  ", 1) for line in result.stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert "weights (fp32)" in rows and "weights (bf16)" not in rows
    assert rows["master weights (fp32)"].startswith("none")


def test_precision_follows_the_preset_default_and_the_flag(capsys):
    tool = load_tool("model_info")
    n = count_parameters(get_preset("andromeda-1b")).total
    assert tool.main(["--model", "andromeda-1b", "--json"]) == 0
    preset = json.loads(capsys.readouterr().out)
    assert preset["precision"] == "bf16" and preset["memory_bytes"]["total"] == 18 * n
    assert tool.main(["--config", DEMO, "--precision", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"
    assert tool.main(["--config", DEMO, "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    tiny = count_parameters(load_config(ROOT / DEMO).model).total
    assert fp32["precision"] == "fp32" and fp32["memory_bytes"]["total"] == 16 * tiny
    assert "weights (fp16)" in tool.format_table({**preset, "precision": "fp16"})
