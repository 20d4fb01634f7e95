"""The checkpoint format: global boxes of shards, atomic commit, verification, no pickles, offline reshard."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from megatron_andromeda import checkpoint as ckpt
from megatron_andromeda.checkpoint import saver, storage
from megatron_andromeda.checkpoint.reshard import cut
from megatron_andromeda.checkpoint.slices import global_pieces, owned_ranges, shard_spec
from megatron_andromeda.config import ModelConfig, load_config
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.parallel.sharding import shard_param
from megatron_andromeda.training.optim import build_optimizer
from megatron_andromeda.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 64, 8
ARCHS = {
    "mqa-swiglu": dict(num_heads=4, num_kv_heads=1),
    "gqa-gelu": dict(num_heads=4, num_kv_heads=2, activation="gelu", tie_embeddings=False),
    "mha-sequential": dict(num_heads=4, num_kv_heads=4, block="sequential"),
}


class Tokens:
    """Deterministic samples with a learnable pattern (next = previous + 1 mod vocabulary)."""

    def __init__(self, n: int = 256):
        starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))
        self.data = (starts[:, None] + torch.arange(SEQ + 1)[None]) % VOCAB

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(SEQ)}


def config(root: Path, *extra: str):
    return load_config(None, [
        f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        f"model.max_seq_length={SEQ}", "model.dropout=0.1", f"data.seq_length={SEQ}",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=6", "train.eval_interval=0",
        "optim.warmup_steps=1", "optim.lr=1e-2", f"logging.run_dir={root / 'run'}",
        "logging.log_interval=1", "logging.progress_bar=false", "logging.tensorboard=false",
        f"checkpoint.save_dir={root / 'ckpt'}", *extra,
    ])  # fmt: skip


def trainer_for(cfg) -> Trainer:
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return Trainer(
        cfg, model, build_optimizer(model, cfg.optim), Tokens(), None, loss_fn=language_model_loss,
        device=torch.device("cpu"), run_dir=Path(cfg.logging.run_dir),
    )  # fmt: skip


def train_losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs its steps again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------------------------- global boxes
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_specs_cut_what_sharding_holds_and_owned_pieces_tile_each_tensor(arch, tp):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, **ARCHS[arch])
    for name, full in GPTModel(cfg, init_seed=0).state_dict().items():
        count = torch.zeros(full.shape)
        for rank in range(tp):
            spec = shard_spec(name, full.shape, cfg, rank, tp)
            shard = shard_param(name, full, cfg, rank, tp)
            assert torch.equal(cut(full, spec), shard), (name, rank)
            owned = owned_ranges(name, full.shape, cfg, rank, tp)
            for box, data in global_pieces(shard.reshape(-1), 0, spec, full.shape, owned):
                assert torch.equal(full[box.slices()], data), (name, rank, box)
                count[box.slices()] += 1
        assert torch.all(count == 1), f"{name}: owned pieces do not cover it exactly once"


def test_optimizer_fragments_map_to_global_boxes_exactly_once():
    """ZeRO fragments are arbitrary flat ranges of a shard: partial rows at both ends included."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1)
    gen = torch.Generator().manual_seed(0)
    tp = 4  # the single KV head is replicated on every rank: only rank 0's copy is written
    for name, full in GPTModel(cfg, init_seed=0).state_dict().items():
        count = torch.zeros(full.shape)
        for rank in range(tp):
            spec, owned = (
                shard_spec(name, full.shape, cfg, rank, tp),
                owned_ranges(name, full.shape, cfg, rank, tp),
            )
            flat = shard_param(name, full, cfg, rank, tp).reshape(-1)
            bounds = [0, *sorted(torch.randint(0, flat.numel(), (3,), generator=gen).tolist()), flat.numel()]
            for a, b in zip(bounds, bounds[1:]):
                for box, data in global_pieces(flat[a:b], a, spec, full.shape, owned):
                    assert torch.equal(full[box.slices()], data), (name, rank, box)
                    count[box.slices()] += 1
        assert torch.all(count == 1), name


# ---------------------------------------------------------------------------------------------------- files
def test_single_process_checkpoint_layout_and_round_trip(tmp_path):
    cfg = config(tmp_path)
    trainer = trainer_for(cfg)
    trainer.fit(stop_at=2)
    path = trainer.save()
    assert sorted(os.listdir(path)) == [
        "config.json", "manifest.json", "metadata.json", "model.safetensors", "optimizer.safetensors",
        "rng.json", "trainer_state.json",
    ]  # fmt: skip
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000002"
    weights = load_file(path / "model.safetensors")  # the streamed writer makes standard files
    for name, param in trainer.model.named_parameters():
        assert torch.equal(weights[name], param), name
    meta = json.loads((path / "metadata.json").read_text())
    entry = meta["tensors"]["optimizer/layers.0.attn.qkv_proj.weight/exp_avg"]
    assert entry["shape"] == [48, 32] and entry["pieces"][0]["offsets"] == [0, 0]
    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["step"], state["consumed_samples"], state["scheduler"]["lr_total_steps"]) == (2, 8, 6)
    fresh = trainer_for(cfg)
    assert fresh.resume(tmp_path / "ckpt") and fresh.state.step == 2
    assert fresh.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()
    for a, b in zip(
        fresh.optimizer.state_dict()["state"].values(), trainer.optimizer.state_dict()["state"].values()
    ):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_async_save_is_byte_identical_to_a_sync_save(tmp_path, monkeypatch):
    cfg = config(tmp_path, "checkpoint.async_save=true")
    trainer = trainer_for(cfg)
    trainer.fit(stop_at=2)
    sync = ckpt.save_checkpoint(
        tmp_path / "sync", 2, cfg, trainer.model, trainer.optimizer, trainer.trainer_state()
    )
    gate, write = threading.Event(), saver.write_payload
    monkeypatch.setattr(saver, "write_payload", lambda tmp, payload: (gate.wait(60), write(tmp, payload)))
    checkpointer = ckpt.Checkpointer(cfg, ckpt.Placement())
    path = checkpointer.save(2, trainer.model, trainer.optimizer, trainer.trainer_state())
    assert checkpointer.in_flight and not path.exists()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()  # training goes on while the save is in flight and changes every weight
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    gate.set()
    checkpointer.wait()
    assert (tmp_path / "ckpt" / "latest").read_text() == path.name
    assert files_of(path) == files_of(sync)


def _train_then_die_while_saving(root: str) -> None:
    """Spawned: save at step 2, then exit (as if killed) after the first file of the step-4 save."""
    torch.set_num_threads(1)
    trainer = trainer_for(config(Path(root), "checkpoint.save_interval=2"))
    trainer.fit(stop_at=2)
    write = storage.write_safetensors

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        os._exit(3)

    saver.write_safetensors = write_then_die
    trainer.fit(stop_at=4)


def test_a_save_killed_part_way_leaves_latest_on_the_previous_checkpoint(tmp_path):
    straight = trainer_for(config(tmp_path / "straight"))
    straight.fit()
    proc = mp.get_context("spawn").Process(target=_train_then_die_while_saving, args=(str(tmp_path),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text() == "step_00000002"
    assert (root / ".step_00000004.tmp" / "model.safetensors").exists()  # the interrupted save's debris
    assert ckpt.resolve_checkpoint(root) == root / "step_00000002"
    resumed = trainer_for(config(tmp_path, "checkpoint.save_interval=2"))
    assert resumed.resume(root) and resumed.state.step == 2
    resumed.fit()
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "straight" / "run")
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]


def _flip_byte(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


def test_damaged_files_are_reported_by_name(tmp_path):
    trainer = trainer_for(config(tmp_path))
    trainer.fit(stop_at=1)
    path = trainer.save()
    ckpt.verify_checkpoint(path)
    middle = (path / "optimizer.safetensors").stat().st_size // 2
    _flip_byte(path / "optimizer.safetensors", middle)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.safetensors fails its sha256"):
        ckpt.load_checkpoint(path, trainer.model, trainer.optimizer)
    _flip_byte(path / "optimizer.safetensors", middle)  # repaired
    (path / "rng.json").write_text((path / "rng.json").read_text()[:-10])
    with pytest.raises(ckpt.CheckpointError, match=r"rng\.json has \d+ bytes, the manifest says"):
        ckpt.verify_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is missing"):
        ckpt.read_model_state(path)


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payloads_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()
    # the same bytes smuggled in as a weights file, with a manifest rewritten to match them
    trainer = trainer_for(config(tmp_path))
    path = trainer.save()
    (path / "model.safetensors").write_bytes(evil.read_bytes())
    manifest = json.loads((path / "manifest.json").read_text())
    data = evil.read_bytes()
    manifest["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        ckpt.load_checkpoint(path, trainer.model, trainer.optimizer)
    assert not marker.exists()


def test_a_different_tokenizer_is_refused_on_resume(tmp_path):
    (tmp_path / "a.json").write_text('{"vocab": "a"}')
    (tmp_path / "b.json").write_text('{"vocab": "b"}')
    trainer = trainer_for(config(tmp_path, f"data.tokenizer={tmp_path / 'a.json'}"))
    trainer.save()
    other = trainer_for(config(tmp_path, f"data.tokenizer={tmp_path / 'b.json'}"))
    with pytest.raises(ckpt.CheckpointError, match="another tokenizer"):
        other.resume(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------ offline layouts
def reshard(source: Path, output: Path, tensor: int, pipeline: int) -> int:
    """tools/reshard_checkpoint.py's exit code."""
    spec = importlib.util.spec_from_file_location("reshard_tool", ROOT / "tools" / "reshard_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [
        "--input",
        str(source),
        "--output",
        str(output),
        "--tensor",
        str(tensor),
        "--pipeline",
        str(pipeline),
    ]
    return module.main(argv)


def test_offline_reshard_round_trips_byte_for_byte(tmp_path):
    trainer = trainer_for(config(tmp_path, "model.num_kv_heads=1"))
    trainer.fit(stop_at=3)
    source = trainer.save()
    assert reshard(tmp_path / "ckpt", tmp_path / "tp2pp2", 2, 2) == 0
    sharded = tmp_path / "tp2pp2" / "step_00000003"
    meta = json.loads((sharded / "metadata.json").read_text())
    assert meta["layout"]["tensor"] == 2 and meta["layout"]["pipeline"] == 2
    assert {f"model-rank0000{r}.safetensors" for r in range(4)} <= set(os.listdir(sharded))
    assert len(meta["tensors"]["model/layers.1.norm.weight"]["pieces"]) == 1  # replicated: written once
    assert len(meta["tensors"]["model/embedding.weight"]["pieces"]) == 2  # vocabulary halves
    _, state = ckpt.read_model_state(tmp_path / "tp2pp2")
    assert all(torch.equal(state[n], p) for n, p in trainer.model.named_parameters())
    assert reshard(sharded, tmp_path / "back", 1, 1) == 0
    back = tmp_path / "back" / "step_00000003"
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        assert (back / name).read_bytes() == (source / name).read_bytes(), name
    assert reshard(sharded, tmp_path / "x", 3, 1) == 2  # 4 heads do not split over 3 ranks


def test_weights_only_checkpoints_at_any_layout_read_back_whole(tmp_path):
    cfg = config(tmp_path, "model.num_kv_heads=2")
    model = GPTModel(cfg.model, init_seed=3)
    path = ckpt.write_model_checkpoint(tmp_path / "w", cfg, model.state_dict(), tensor=2, pipeline=2)
    read_cfg, state = ckpt.read_model_state(path)
    assert (read_cfg.parallel.tensor, read_cfg.parallel.pipeline) == (2, 2)
    assert list(state) == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters())
    fresh = GPTModel(cfg.model, init_seed=4)
    ckpt.load_model_weights(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    with pytest.raises(ckpt.CheckpointError, match="num_heads: 4 != 8"):
        ckpt.load_model_weights(path, GPTModel(ModelConfig(**{**cfg.model.__dict__, "num_heads": 8})))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_snapshotted_through_pinned_memory(tmp_path):
    cfg = config(tmp_path, "checkpoint.async_save=true")
    model = GPTModel(cfg.model, init_seed=0).cuda()
    optimizer = build_optimizer(model, cfg.optim)
    loss, _ = language_model_loss(model(Tokens(2).data[:, :SEQ].cuda()), Tokens(2).data[:, 1:].cuda())
    loss.backward()
    optimizer.step()
    sync = ckpt.save_checkpoint(tmp_path / "sync", 1, cfg, model, optimizer, {})
    checkpointer = ckpt.Checkpointer(cfg, ckpt.Placement())
    path = checkpointer.save(1, model, optimizer, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the snapshot was taken before this
    checkpointer.wait()
    assert files_of(path) == files_of(sync)
    ckpt.load_checkpoint(path, model, optimizer)
    _, state = ckpt.read_model_state(path)
    assert all(torch.equal(state[n], p.cpu()) for n, p in model.named_parameters())
