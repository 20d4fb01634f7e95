"""`python -m megatron_andromeda.train` end to end on real .bin/.idx data, and multi-stage runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hang_guard import HANG_GUARD_S
from tiny_tokenizer import FOX, train_tiny_tokenizer, write_random_documents

from megatron_andromeda import train as train_module
from megatron_andromeda.checkpoint import read_model_state
from megatron_andromeda.config import ConfigError, load_config
from megatron_andromeda.train import run
from megatron_andromeda.training.stages import plan_stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny byte-level BPE tokenizer and three datasets with different token statistics."""
    root = tmp_path_factory.mktemp("entry")
    train_tiny_tokenizer(root / "tokenizer.json", [FOX] * 50)
    for k, (name, low, high) in enumerate((("a", 2, 100), ("b", 100, 200), ("c", 200, 290))):
        for split, docs in (("train", 60), ("valid", 8)):
            write_random_documents(
                root / f"{name}_{split}_text_document", docs, low, high, seed=2 * k + (split == "valid")
            )
    return root


def overrides(ws: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.tokenizer={ws / 'tokenizer.json'}", f"data.train=[{ws / 'a_train_text_document'}]",
        f"data.valid=[{ws / 'a_valid_text_document'}]", "data.seq_length=16",
        "model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.max_seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=6",
        "train.eval_interval=3", "train.eval_batches=2", "optim.warmup_steps=1", "logging.log_interval=1",
        f"logging.run_dir={run_dir}", "logging.tensorboard=false", *extra,
    ]  # fmt: skip


def train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"train"' in line]


def test_module_entry_point_trains_and_writes_outputs(workspace, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "megatron_andromeda.train",
        *overrides(workspace, run_dir),
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr
    assert "step      6/6" in result.stdout and "valid step" in result.stdout
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 6
    assert len(train_losses(run_dir)) == 6
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["consumed_samples"] == 24 and report["sources"][0]["tokens"] == 24 * 16
    config, state = read_model_state(tmp_path / "ckpt")
    assert config.model.hidden_size == 32 and "embedding.weight" in state


def test_bad_inputs_stop_before_training(workspace, tmp_path):
    def error(*extra):
        with pytest.raises(Exception) as err:
            run(load_config(None, overrides(workspace, tmp_path, *extra)))
        return str(err.value)

    assert "data.tokenizer=/missing/tok.json does not exist" in error("data.tokenizer=/missing/tok.json")
    assert "/missing/set" in error("data.train=[/missing/set]")
    assert "model.vocab_size" in error("model.vocab_size=200")  # tokenizer and token ids exceed it
    missing = tmp_path / "no_such_run"
    message = error(f"checkpoint.load_dir={missing}")
    assert f"checkpoint.load_dir={missing} holds no complete checkpoint" in message
    same = overrides(workspace, tmp_path, f"checkpoint.load_dir={missing}", f"checkpoint.save_dir={missing}")
    train_module._check_inputs(load_config(None, same))  # a job's first launch: nothing to resume yet
    result = subprocess.run(
        [sys.executable, "-m", "megatron_andromeda.train", "model.num_layer=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode != 0 and "did you mean model.num_layers" in result.stderr


def stage_config(ws: Path, tmp_path: Path, *extra: str):
    return load_config(None, stage_overrides(ws, tmp_path, *extra))


def stage_overrides(ws: Path, tmp_path: Path, *extra: str, freeze: str = "'embedding.*'") -> list[str]:
    stages = (
        "stages=[{name: pretrain, train: ['" + str(ws / "a_train_text_document") + "'], steps: 4},"
        " {name: code, train: ['0.5', '"
        + str(ws / "b_train_text_document")
        + "', '0.5', '"
        + str(ws / "c_train_text_document")
        + "'], steps: 4, lr: 0.005, warmup_steps: 2,"
        " freeze: [" + freeze + "]},"
        " {name: chat, train: ['"
        + str(ws / "c_train_text_document")
        + "'], steps: 2, lr_schedule: continue}]"
    )
    return overrides(
        ws,
        tmp_path / "runs",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=2",
        stages,
        *extra,
    )


def test_three_stage_run_chains_weights_and_schedules(workspace, tmp_path):
    cfg = stage_config(workspace, tmp_path)
    plans = plan_stages(cfg)
    assert [p.label for p in plans] == ["0-pretrain", "1-code", "2-chat"]
    assert plans[1].config.train.init_from.endswith("0-pretrain") and not plans[0].config.train.init_from
    assert (plans[2].lr_step_offset, plans[2].lr_total_steps) == (8, 10)
    run(cfg)
    _, stage1 = read_model_state(tmp_path / "ckpt" / "0-pretrain")
    _, stage2 = read_model_state(tmp_path / "ckpt" / "1-code")
    # stage 2 started from stage 1's weights; its frozen embedding never moved
    assert torch.equal(stage1["embedding.weight"], stage2["embedding.weight"])
    assert not torch.equal(stage1["layers.0.attn.qkv_proj.weight"], stage2["layers.0.attn.qkv_proj.weight"])
    lrs = [
        json.loads(line)["lr"]
        for line in (tmp_path / "runs/1-code/metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert lrs[0] == pytest.approx(0.0025) and lrs[1] == pytest.approx(0.005)  # re-warmed to the stage's lr
    report = json.loads((tmp_path / "runs/1-code/data_report.json").read_text())
    assert [s["samples"] for s in report["sources"]] == [8, 8]


def test_resume_inside_stage_two_equals_uninterrupted(workspace, tmp_path):
    straight = stage_config(workspace, tmp_path / "s")
    run(straight)
    interrupted = stage_config(workspace, tmp_path / "i")
    plans = plan_stages(interrupted)
    from megatron_andromeda.parallel import init_parallel
    from megatron_andromeda.train import run_stage

    ctx = init_parallel(interrupted)  # one process: the run's layout, no process group
    run_stage(plans[0].config, ctx)
    # a job that ends after step 2 of stage 2: its checkpoint at step 2 exists, nothing later
    killed = plans[1].config
    killed.train.exit_interval = 2
    run_stage(killed, ctx, plans[1].stage.freeze, plans[1].lr_step_offset, plans[1].lr_total_steps)
    assert not (tmp_path / "i/ckpt/1-code/step_00000004").exists()
    run(interrupted)  # the same command again: stage 1 is done, stage 2 resumes at step 2
    for label in ("1-code", "2-chat"):
        a = train_losses(tmp_path / f"s/runs/{label}")
        b = train_losses(tmp_path / f"i/runs/{label}")
        assert a[-2:] == b[-2:], label
    _, final_a = read_model_state(tmp_path / "s/ckpt/2-chat")
    _, final_b = read_model_state(tmp_path / "i/ckpt/2-chat")
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


def test_stage_config_errors(workspace, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of tokens and steps"):
        load_config(
            None,
            overrides(
                workspace, tmp_path, f"checkpoint.save_dir={tmp_path}", "stages=[{name: a, train: [x]}]"
            ),
        )
    with pytest.raises(ConfigError, match="needs checkpoint.save_dir"):
        load_config(None, overrides(workspace, tmp_path, "stages=[{name: a, train: [x], steps: 1}]"))


def test_chat_datasets_train_only_on_replies(workspace, tmp_path):
    from megatron_andromeda.config import DataConfig
    from megatron_andromeda.data.builder import build_datasets
    from megatron_andromeda.data.sft_dataset import SFTDataset, SFTDatasetWriter
    from megatron_andromeda.data.tokenizer import load_tokenizer

    prefix = tmp_path / "chat"
    with SFTDatasetWriter(prefix, vocab_size=300) as writer:
        for n in (7, 9, 5, 11):
            writer.add(np.arange(2, 2 + n), np.array([0] * (n // 2) + [1] * (n - n // 2), dtype=np.uint8))
    data = DataConfig(train=[f"{prefix}_text_document"], seq_length=16)
    train, _, _ = build_datasets(data, load_tokenizer(str(workspace / "tokenizer.json")), (6, 0, 0), 16, 320)
    assert isinstance(train, SFTDataset)
    sample = train[0]
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids", "segment_ids"}
    assert 0 < sample["loss_mask"].sum() < 16


def test_a_blend_of_chat_and_plain_data_batches_together(workspace, tmp_path):
    """Stage 3 of the strategy mixes instruction sets (loss-masked) with web text in one blend."""
    from torch.utils.data import default_collate

    from megatron_andromeda.config import DataConfig
    from megatron_andromeda.data.builder import build_datasets
    from megatron_andromeda.data.sft_dataset import SFTDatasetWriter
    from megatron_andromeda.data.tokenizer import load_tokenizer

    prefix = tmp_path / "chat"
    with SFTDatasetWriter(prefix, vocab_size=300) as writer:
        for n in (7, 9, 5, 11):
            writer.add(np.arange(2, 2 + n), np.array([0] * (n // 2) + [1] * (n - n // 2), dtype=np.uint8))
    tok = load_tokenizer(str(workspace / "tokenizer.json"))
    mix = ["0.5", f"{prefix}_text_document", "0.5", str(workspace / "a_train_text_document")]
    with pytest.raises(ConfigError, match="mixes chat datasets .* set data.reset_attention_mask=true"):
        build_datasets(DataConfig(train=mix, seq_length=16, cache_dir=str(tmp_path)), tok, (8, 0, 0), 16, 320)
    data = DataConfig(train=mix, seq_length=16, reset_attention_mask=True, reset_position_ids=True,
                      cache_dir=str(tmp_path))  # fmt: skip
    train, _, _ = build_datasets(data, tok, (8, 0, 0), 16, 320)
    batch = default_collate([train[i] for i in range(8)])
    assert batch["tokens"].shape == batch["segment_ids"].shape == (8, 16)
    masked = (batch["loss_mask"] == 0).all(dim=1) | (batch["loss_mask"] < 1).any(dim=1)
    assert 0 < int(masked.sum()) < 8  # chat samples mask their prompts; plain samples train everywhere


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        ["parallel.data=2", "parallel.distributed_optimizer=true"],
        ["parallel.data=2", "parallel.data_sharding=full", "checkpoint.save_interval=2"],
        ["parallel.pipeline=2", "parallel.recompute=full"],
    ],
    ids=["tensor2-sp", "data2-zero1", "data2-full", "pipeline2-recompute"],
)
def test_torchrun_layouts_match_one_process(workspace, tmp_path, layout):
    common = ["model.dropout=0.0", "train.steps=4", "train.eval_interval=2", "model.num_kv_heads=1"]
    single = tmp_path / "single"
    run(load_config(None, overrides(workspace, single, *common)))
    multi = tmp_path / "multi"
    if any(o.startswith("checkpoint.") for o in layout):  # (the fully sharded run also saves)
        layout = [*layout, f"checkpoint.save_dir={tmp_path / 'ckpt'}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "megatron_andromeda.train",
        *overrides(workspace, multi, *common),
        *layout,
    ]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank layout" in result.stdout.lower() or "tensor" in result.stdout
    np.testing.assert_allclose(train_losses(multi), train_losses(single), rtol=1e-5)
    np.testing.assert_allclose(valid_losses(multi), valid_losses(single), rtol=1e-5)
    assert len(valid_losses(single)) == 3  # steps 0, 2 and 4
    if (tmp_path / "ckpt").exists():  # each data rank wrote its shard of the weights
        meta = json.loads((tmp_path / "ckpt" / "step_00000004" / "metadata.json").read_text())
        assert meta["layout"]["data_sharding"] == "full"
        files = {piece["file"] for piece in meta["tensors"]["model/embedding.weight"]["pieces"]}
        assert files == {"model-rank00000.safetensors", "model-rank00001.safetensors"}


SCHEDULE_COMMON = ["model.dropout=0.0", "model.num_layers=4", "model.num_kv_heads=1", "train.steps=3",
                   "train.eval_interval=3", "parallel.pipeline=2"]  # fmt: skip


@pytest.fixture(scope="module")
def four_layer_single_process(workspace, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("schedules") / "single"
    single = [o for o in SCHEDULE_COMMON if not o.startswith("parallel.")]
    run(load_config(None, overrides(workspace, run_dir, *single)))
    return run_dir


@pytest.mark.parametrize(
    "schedule",
    [["parallel.schedule=gpipe"], ["parallel.schedule=1f1b"], ["parallel.virtual_stages=2"]],
    ids=["gpipe", "1f1b", "interleaved"],
)
def test_every_pipeline_schedule_trains_through_the_entry_point(
    workspace, tmp_path, four_layer_single_process, schedule
):
    """Issue 21: the interleaved schedule crashed here (its model chunks reached the kernel swap)."""
    multi = tmp_path / "multi"
    result = torchrun(2, overrides(workspace, multi, *SCHEDULE_COMMON, *schedule))
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(train_losses(multi), train_losses(four_layer_single_process), rtol=1e-5)
    np.testing.assert_allclose(valid_losses(multi), valid_losses(four_layer_single_process), rtol=1e-5)


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megatron_andromeda.train", *args]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)


@pytest.mark.parametrize(
    "layout, freeze",
    [
        ("parallel.tensor=2", "'embedding.*'"),
        # The first stage holds no layers.1, the second only the tied copy of the embedding
        # (lm_head): patterns name the model's parameters, so both copies freeze alike.
        ("parallel.pipeline=2", "'embedding.*', 'layers.1.*'"),
    ],
    ids=["tensor2", "pipeline2"],
)
def test_torchrun_stages_load_the_previous_stage_into_a_sharded_model(workspace, tmp_path, layout, freeze):
    """Stages 2 and 3 start from the last checkpoint through the resharding load on every rank; a
    stage's freeze patterns mean the same on every layout."""
    common = ["model.dropout=0.0", "model.num_kv_heads=1"]
    run(load_config(None, stage_overrides(workspace, tmp_path / "single", *common, freeze=freeze)))
    result = torchrun(2, stage_overrides(workspace, tmp_path / "multi", *common, layout, freeze=freeze))
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("0-pretrain", "1-code", "2-chat"):
        np.testing.assert_allclose(
            train_losses(tmp_path / f"multi/runs/{label}"),
            train_losses(tmp_path / f"single/runs/{label}"),
            rtol=1e-5,
            err_msg=label,
        )
    _, single = read_model_state(tmp_path / "single/ckpt/2-chat")
    _, multi = read_model_state(tmp_path / "multi/ckpt/2-chat")
    for name in single:  # Adam turns fp32 reduction-order noise into ~1e-6 steps: far below lr=5e-3
        torch.testing.assert_close(multi[name], single[name], rtol=1e-4, atol=2e-5, msg=name)


def valid_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"valid"' in line]


def test_freeze_patterns_are_checked_on_the_whole_model_and_layout():
    from megatron_andromeda.parallel import plan_layout

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
                             "parallel.pipeline=2", "model.vocab_size=256"])  # fmt: skip
    layout = plan_layout(cfg, 2)
    train_module.check_freeze(["layers.1.*"], cfg.model, layout)  # pipeline rank 0 holds none: fine
    with pytest.raises(ConfigError, match=r"\['lm_head\.\*'\] match no parameter"):
        train_module.check_freeze(["layers.*", "lm_head.*"], cfg.model, layout)  # tied: it is embedding
    with pytest.raises(ConfigError, match="every parameter of pipeline rank 0"):
        train_module.check_freeze(["embedding.*", "layers.0.*"], cfg.model, layout)
    single = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4"])
    with pytest.raises(ConfigError, match="the whole model"):
        train_module.check_freeze(["*"], single.model, plan_layout(single, 1))
