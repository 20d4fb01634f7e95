"""Config loading, overrides and the errors users see."""

import json
from pathlib import Path

import pytest

from megatron_andromeda.config import ConfigError, load_config, save_resolved_config
from megatron_andromeda.models.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIGS = sorted((ROOT / "examples").rglob("configs/*.yaml"))


def test_examples_exist():
    assert len(EXAMPLE_CONFIGS) >= 4


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.num_layers > 0


def test_three_stage_example_plans_the_seeds_budgets():
    from megatron_andromeda.training.stages import plan_stages

    plans = plan_stages(load_config(ROOT / "examples/configs/andromeda_100m_3stage.yaml"))
    tokens_per_step = 256 * 2048
    assert [p.label for p in plans] == ["0-pretrain", "1-medium", "2-instructions"]
    assert [p.config.train.steps for p in plans] == [-(-int(t) // tokens_per_step) for t in (2e10, 5e9, 1e9)]
    assert plans[1].config.train.init_from.endswith("0-pretrain")
    last = plans[2].config.data
    assert last.reset_attention_mask and last.recipe.endswith("stage3_low_priority.yaml")


def test_preset_then_dotted_overrides():
    cfg = load_config(None, ["model=andromeda-1b", "model.num_layers=4", "optim.lr=1e-3", "train.steps=7"])
    assert cfg.model.name == "andromeda-1b"
    assert cfg.model.hidden_size == PRESETS["andromeda-1b"].hidden_size
    assert cfg.model.num_layers == 4
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7


def test_yaml_preset_is_refined_by_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: palm-150m\ntrain:\n  steps: 3\n")
    cfg = load_config(path, ["model.num_kv_heads=8"])
    assert cfg.model.hidden_size == 768 and cfg.model.num_kv_heads == 8


def test_unknown_key_names_nearest_valid_keys():
    with pytest.raises(ConfigError, match=r"model.num_layer'.*did you mean model.num_layers"):
        load_config(None, ["model.num_layer=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.steps=3"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'andromeda-2b'.*andromeda-1b"):
        load_config(None, ["model=andromeda-2b"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.num_heads=5", "model.hidden_size=768 is not divisible by model.num_heads=5"),
        ("model.num_kv_heads=3", "model.num_heads=8 must be a multiple of model.num_kv_heads=3"),
        ("model.block=diagonal", "model.block='diagonal' is not one of"),
        ("train.global_batch_size=30", "train.global_batch_size=30 must be a multiple"),
        ("train.steps=0", "train.steps=0 must be positive"),
        # every numeric field has its range checked at load (issue 21 section 7)
        ("model.head_dim=0", "model.head_dim=0 must be positive"),
        ("model.ffn_hidden_size=0", "model.ffn_hidden_size=0 must be positive"),
        ("model.logit_scale=0", "model.logit_scale=0.0 must be > 0"),
        ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"),
        ("model.rotary_base=0", "model.rotary_base=0.0 must be > 1"),
        ("parallel.comm_timeout_s=0", "parallel.comm_timeout_s=0.0 must be > 0"),
        ("parallel.comm_timeout_s=.inf", "parallel.comm_timeout_s=inf is not a finite number"),
        ("train.eval_interval=-1", "train.eval_interval=-1 must be >= 0"),
        ("train.eval_batches=-1", "train.eval_batches=-1 must be >= 0"),
        ("train.eval_batches=0", "train.eval_batches=0; set train.eval_batches >= 1"),
        ("train.exit_interval=-1", "train.exit_interval=-1 must be >= 0"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
        ("optim.decay_steps=-1", "optim.decay_steps=-1 must be positive"),
        ("data.num_workers=0", "unknown config key 'data.num_workers'"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("train.steps=many", "train.steps must be an integer"),
        ("parallel.context=2", "parallel.context is reserved"),
    ],
)
def test_impossible_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_sequence_parallel_needs_a_divisible_sequence():
    overrides = ["parallel.tensor=4", "parallel.sequence_parallel=true", "data.seq_length=1022"]
    with pytest.raises(ConfigError, match="data.seq_length=1022 is not a multiple of it"):
        load_config(None, overrides)
    assert load_config(None, [*overrides[:2], "data.seq_length=1024"]).parallel.sequence_parallel


def test_resolved_config_written_as_json(tmp_path):
    cfg = load_config(None, ["model=andromeda-100m", "train.steps=5"])
    path = save_resolved_config(cfg, tmp_path / "run")
    data = json.loads(path.read_text())
    assert data["model"]["name"] == "andromeda-100m" and data["train"]["steps"] == 5
    assert load_config(None, []).to_dict() != data


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")
