"""The single-process loop: determinism, exact resume, accumulation, schedule, safe steps."""

import json

import pytest
import torch

from megatron_andromeda import checkpoint as ckpt
from megatron_andromeda.config import OptimConfig, load_config
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.training.optim import build_optimizer, learning_rate
from megatron_andromeda.training.trainer import Trainer

VOCAB, SEQ = 64, 16


class SyntheticTokens:
    """Deterministic token samples with a learnable pattern (next = previous + 1 mod vocab)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n,), generator=g)
        self.data = (starts[:, None] + torch.arange(SEQ + 1)[None]) % VOCAB

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(SEQ)}


def tiny_config(tmp_path, *extra):
    return load_config(
        None,
        [
            "model.vocab_size=64",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.max_seq_length=16",
            "data.seq_length=16",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.steps=8",
            "train.eval_interval=4",
            "train.eval_batches=2",
            "optim.warmup_steps=2",
            "optim.lr=1e-2",
            "optim.min_lr=1e-3",
            "model.dropout=0.1",
            f"logging.run_dir={tmp_path / 'run'}",
            "logging.log_interval=2",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def make_trainer(cfg, tmp_path):
    torch.manual_seed(cfg.train.seed)
    model = GPTModel(cfg.model)
    return Trainer(
        cfg,
        model,
        build_optimizer(model, cfg.optim),
        SyntheticTokens(256),
        SyntheticTokens(32, 1),
        loss_fn=language_model_loss,
        device=torch.device("cpu"),
        run_dir=tmp_path / "run",
    )


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl") if '"train"' in line]


def test_two_runs_with_one_seed_are_identical(tmp_path):
    a = make_trainer(tiny_config(tmp_path / "a"), tmp_path / "a")
    b = make_trainer(tiny_config(tmp_path / "b"), tmp_path / "b")
    torch.manual_seed(7)
    a.fit()
    torch.manual_seed(7)
    b.fit()
    assert losses(tmp_path / "a/run") == losses(tmp_path / "b/run")
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_resume_gives_the_same_losses_bitwise(tmp_path):
    straight = make_trainer(tiny_config(tmp_path / "s"), tmp_path / "s")
    torch.manual_seed(7)
    straight.fit()

    save = tmp_path / "ckpt"
    first = make_trainer(
        tiny_config(
            tmp_path / "r", "train.steps=8", f"checkpoint.save_dir={save}", "checkpoint.save_interval=4"
        ),
        tmp_path / "r",
    )
    torch.manual_seed(7)
    first.fit(stop_at=4)  # stop half-way, as a killed run would
    second = make_trainer(tiny_config(tmp_path / "r", f"checkpoint.save_dir={save}"), tmp_path / "r")
    torch.manual_seed(999)  # resume must restore every RNG itself
    assert second.resume(save)
    assert second.state.step == 4 and second.state.consumed_samples == 16
    second.fit()
    assert losses(tmp_path / "r/run") == losses(tmp_path / "s/run")
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def test_accumulation_equals_one_big_batch(tmp_path):
    big = make_trainer(
        tiny_config(tmp_path / "a", "train.micro_batch_size=4", "model.dropout=0.0"), tmp_path / "a"
    )
    acc = make_trainer(
        tiny_config(tmp_path / "b", "train.micro_batch_size=1", "model.dropout=0.0"), tmp_path / "b"
    )
    assert acc.accumulation_steps == 4
    big.train_step(), acc.train_step()
    for (n, p), (_, q) in zip(big.model.named_parameters(), acc.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_training_lowers_validation_loss(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "train.steps=30", "model.dropout=0.0"), tmp_path)
    before = trainer.evaluate()["loss"]
    trainer.fit()
    assert trainer.evaluate()["loss"] < 0.5 * before


def test_non_finite_gradient_skips_the_update(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "train.max_consecutive_skips=2"), tmp_path)
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.hooks.finish_gradients = lambda model: model.embedding.weight.grad.fill_(float("nan"))
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1.0 and trainer.state.skipped_steps == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not trainer.optimizer.state  # Adam state untouched too
    with pytest.raises(RuntimeError, match="2 consecutive steps had non-finite"):
        trainer.train_step()


def test_per_source_losses_of_a_blended_batch(tmp_path):
    import copy

    from megatron_andromeda.data.blended_dataset import BlendedDataset

    class RandomTokens(SyntheticTokens):
        def __init__(self, n: int):
            self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(3))

    cfg = tiny_config(tmp_path, "model.dropout=0.0", "train.global_batch_size=8")
    blend = BlendedDataset(
        [SyntheticTokens(64), RandomTokens(64)], [0.5, 0.5], 64, names=["pattern", "noise"]
    )
    trainer = make_trainer(cfg, tmp_path)
    trainer.train_data = blend
    trainer.num_sources = 2
    before = copy.deepcopy(trainer.model)
    metrics = trainer.train_step()
    expected = {}
    for source, name in enumerate(blend.source_names):
        rows = [blend[i] for i in range(8) if blend.dataset_index[i] == source]
        logits = before(torch.stack([r["tokens"] for r in rows]))
        labels = torch.stack([r["labels"] for r in rows])
        expected[f"loss/{name}"] = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten()
        ).item()
    assert set(expected) <= set(metrics)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    assert metrics["loss/pattern"] != pytest.approx(metrics["loss/noise"], rel=1e-3)
    trainer.fit(stop_at=2)  # the logged record (metrics.jsonl, TensorBoard) carries them too
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "train" and r["step"] == 2]
    assert logged and {"loss/pattern", "loss/noise"} <= set(logged[0])


def test_learning_rate_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_style="cosine")
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_style="linear")
    assert learning_rate(25, linear, 100) == pytest.approx(0.75)


def test_no_weight_decay_on_norms_and_embeddings(tmp_path):
    cfg = tiny_config(tmp_path)
    model = GPTModel(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2 and not name.startswith("embedding")), name


def test_checkpoint_detects_corruption_and_falls_back(tmp_path):
    trainer = make_trainer(
        tiny_config(tmp_path, f"checkpoint.save_dir={tmp_path / 'c'}", "checkpoint.save_interval=4"), tmp_path
    )
    trainer.fit()
    root = tmp_path / "c"
    newest = root / "step_00000008"
    assert (root / "latest").read_text() == newest.name
    # a flipped byte is reported with the file name
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.verify_checkpoint(newest)
    # an incomplete newest checkpoint (no manifest) falls back to the previous one
    (newest / ckpt.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="falling back"):
        assert ckpt.resolve_checkpoint(root) == root / "step_00000004"


def test_mfu_arithmetic_on_a_known_configuration(tmp_path):
    cfg = tiny_config(tmp_path, "logging.peak_flops=1.0e9")
    trainer = make_trainer(cfg, tmp_path)
    trainer.state.step = 1
    metrics = trainer._speed_metrics(
        {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0}, elapsed=2.0, steps=1, run_start=0.0, start_step=0
    )
    # by hand: d=32, L=2, 4 heads of 8, 1 KV head, ffn 128, V=64, T=16, global batch 4
    d, L, V, T = 32, 2, 64, 16
    per_layer = d * (4 + 2) * 8 + 4 * 8 * d + 3 * d * 128 + d
    n = L * per_layer + d + V * d
    flops_per_token = 6 * n + 12 * L * 4 * 8 * T
    tokens_per_s = 4 * T / 2.0
    assert metrics["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert metrics["tflops_per_device"] == pytest.approx(tokens_per_s * flops_per_token / 1e12)
    assert metrics["mfu"] == pytest.approx(tokens_per_s * flops_per_token / 1e9)
