"""Stage recipes and the data plan."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hang_guard import HANG_GUARD_S

from megatron_andromeda.config import ConfigError, DataConfig
from megatron_andromeda.data.blend import resolve_blends
from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter
from megatron_andromeda.data.recipe import load_recipe, plan_stage

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_with_weights_summing_to_one(path):
    recipe = load_recipe(path)
    assert recipe.tokens and len(recipe.sources) >= 5
    assert sum(recipe.weights()) == pytest.approx(1.0)
    raw = [s.weight for s in recipe.sources]
    assert sum(raw) == pytest.approx(1.0), "the shipped weights are meant to be shares"


def test_mpt_1b_mix_is_the_documented_one():
    recipe = load_recipe(ROOT / "examples/data/mpt_1b_mix.yaml")
    shares = {s.name: w for s, w in zip(recipe.sources, recipe.weights())}
    assert shares["redpajama-common-crawl"] == pytest.approx(0.67)
    assert shares["c4-en"] == pytest.approx(0.15)
    assert shares["redpajama-arxiv"] == pytest.approx(0.025)


def test_token_budgets_become_shares_and_blends(tmp_path):
    for name in ("web", "code"):
        for split in ("train", "valid"):
            with IndexedDatasetWriter(tmp_path / f"{name}_{split}_text_document", np.uint16) as w:
                w.add_document(np.arange(10))
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: s\nsources:\n  - {{name: web, prefix: {tmp_path}/web, tokens: 3.0e9}}\n"
        f"  - {{name: code, prefix: {tmp_path}/code, tokens: 1.0e9}}\n"
    )
    recipe = load_recipe(path)
    assert recipe.weights() == pytest.approx([0.75, 0.25])
    blends = resolve_blends(DataConfig(recipe=str(path)))
    train = blends["train"]
    assert train.names == ["web", "code"]  # the recipe's names travel with the blend
    assert train.prefixes == [f"{tmp_path}/web_train_text_document", f"{tmp_path}/code_train_text_document"]
    assert train.weights.tolist() == pytest.approx([0.75, 0.25])
    assert blends["valid"].prefixes[1].endswith("code_valid_text_document")
    assert not blends["test"]  # no test files: left out
    plan = plan_stage(recipe, 8e9, [4_000_000_000, 1_000_000_000])
    assert [s.effective_tokens for s in plan.sources] == pytest.approx([6e9, 2e9])
    assert [s.epochs for s in plan.sources] == pytest.approx([1.5, 2.0])


@pytest.mark.parametrize(
    "body, message",
    [
        ("sources: []", "non-empty `sources:`"),
        ("sources:\n  - {name: a, prefix: p}", "exactly one of `weight` and `tokens`"),
        ("sources:\n  - {name: a, prefix: p, weight: 1, tokens: 2}", "exactly one of"),
        ("sources:\n  - {name: a, prefix: p, weight: 1}\n  - {name: b, prefix: q, tokens: 5}", "not a mix"),
        ("sources:\n  - {name: a, prefx: p, weight: 1}", "unknown keys"),
    ],
)
def test_recipe_errors_name_the_file(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert "bad.yaml" in str(err.value)


def test_plan_data_tool_warns_about_evaluation_sets_and_repeats(tmp_path):
    with IndexedDatasetWriter(tmp_path / "small_train_text_document", np.uint16) as w:
        w.add_document(np.arange(1000))
    path = tmp_path / "stage.yaml"
    path.write_text(
        f"name: s\ntokens: 1.0e5\nsources:\n  - {{name: small, prefix: {tmp_path}/small, weight: 0.9}}\n"
        f"  - {{name: piqa, prefix: {tmp_path}/piqa, weight: 0.1}}\n"
    )
    result = subprocess.run(
        [sys.executable, "tools/plan_data.py", str(path), "--max-epochs", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    assert "small" in result.stdout and "90.00" in result.stdout  # 90k tokens of a 1k-token source
    assert "WARNING s/small: 90.0 epochs" in result.stderr
    assert "WARNING s/piqa: also an evaluation set" in result.stderr
