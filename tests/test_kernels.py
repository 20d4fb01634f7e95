"""Kernel selection and the swapped modules.

On CPU the optional libraries are replaced by fake modules in `sys.modules` whose kernels compute
the reference math and record their calls, so the code paths that import and call them really run;
`None` in `sys.modules` makes an installed library look missing. GPU tests (marked) compare each
real kernel with the plain path within bf16 tolerance.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from megatron_andromeda import kernels
from megatron_andromeda.builder import build_loss_fn
from megatron_andromeda.config import ConfigError, ModelConfig
from megatron_andromeda.kernels import (
    BackendChoice,
    BackendConfig,
    Environment,
    FlashCoreAttention,
    Library,
    apply_kernels,
    compile_blocks,
    fp8_context,
    fused_cross_entropy,
    probe_environment,
    select_backends,
)
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.models.attention import Attention, CoreAttention
from megatron_andromeda.models.rotary import apply_rotary
from megatron_andromeda.parallel import ParallelContext, make_loss_fn

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
HAVE = Library("9.9", "")
_SHAPE = dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=1)
TINY = ModelConfig(**_SHAPE, ffn_hidden_size=96, max_seq_length=32)


def gpu_env(**kw) -> Environment:
    base = dict(device_type="cuda", capability=(9, 0))
    return Environment(**{**base, **kw})


def build(cfg: ModelConfig = TINY, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


def tokens(cfg: ModelConfig = TINY, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- selection
def test_cpu_defaults_fall_back_with_reasons():
    choice = select_backends(BackendConfig(), CPU, env=Environment())
    assert (choice.attention, choice.linear, choice.fp8) == ("sdpa", "torch", "none")
    assert (choice.rotary, choice.cross_entropy, choice.compile) == ("torch", "torch", False)
    line = choice.describe()
    assert "attention=sdpa (no CUDA device; torch picks its CPU kernels)" in line
    assert "linear=torch (transformer-engine not installed)" in line
    assert "compile=off" in line


def test_gpu_without_flash_says_so():
    choice = select_backends(BackendConfig(), CUDA, env=gpu_env())
    assert choice.attention == "sdpa"
    assert choice.reasons["attention"] == "flash-attn not installed; torch picks its flash / cuDNN kernels"


@pytest.mark.parametrize(
    ("capability", "fa2", "fa3", "expected"),
    [
        ((9, 0), True, True, "flash3"),
        ((9, 0), False, True, "flash3"),
        ((9, 0), True, False, "flash2"),
        ((8, 0), True, True, "flash2"),  # flash-attn 3 is Hopper-only
        ((8, 0), False, True, "sdpa"),
        ((7, 5), True, False, "sdpa"),  # pre-Ampere
    ],
)
def test_attention_picks_the_newest_usable_flash(capability, fa2, fa3, expected):
    env = gpu_env(
        capability=capability, flash_attn=HAVE if fa2 else Library(), flash_attn_3=HAVE if fa3 else Library()
    )
    assert select_backends(BackendConfig(), CUDA, env=env).attention == expected


def test_flash_needs_half_precision():
    choice = select_backends(BackendConfig(), CUDA, precision="fp32", env=gpu_env(flash_attn=HAVE))
    assert choice.attention == "sdpa" and "train.precision=fp32" in choice.reasons["attention"]
    with pytest.raises(ConfigError, match="backend.attention=flash cannot run: train.precision=fp32"):
        select_backends(
            BackendConfig(attention="flash"), CUDA, precision="fp32", env=gpu_env(flash_attn=HAVE)
        )


def test_explicit_flash_without_flash_is_an_error():
    with pytest.raises(ConfigError, match="backend.attention=flash cannot run: flash-attn not installed"):
        select_backends(BackendConfig(attention="flash"), CUDA, env=gpu_env())


def test_te_auto_and_explicit():
    """TE is chosen at any tensor degree (selection no longer looks at it), norms fused by default."""
    env = gpu_env(transformer_engine=HAVE)
    choice = select_backends(BackendConfig(), CUDA, env=env)
    assert (choice.linear, choice.fp8, choice.fuse_norm) == ("te", "none", True)
    assert choice.reasons["linear"] == "transformer-engine 9.9; norms fused into LayerNormLinear"
    assert not select_backends(BackendConfig(fuse_norm=False), CUDA, env=env).fuse_norm
    plain = select_backends(BackendConfig(linear="torch"), CUDA, env=env)
    assert (plain.linear, plain.fuse_norm) == ("torch", False)
    with pytest.raises(ConfigError, match="backend.linear=te needs Transformer Engine.*not installed"):
        select_backends(BackendConfig(linear="te"), CUDA, env=gpu_env())


@pytest.mark.parametrize("fp8", ["delayed", "current"])
def test_fp8_without_te_is_an_error_not_a_fallback(fp8):
    with pytest.raises(ConfigError, match=f"backend.fp8={fp8} needs Transformer Engine"):
        select_backends(BackendConfig(fp8=fp8), CUDA, env=gpu_env())
    with pytest.raises(ConfigError, match=f"backend.fp8={fp8} needs Transformer Engine.*no CUDA device"):
        select_backends(BackendConfig(fp8=fp8), CPU, env=Environment(transformer_engine=HAVE))


def test_fp8_needs_capability_8_9():
    env = gpu_env(capability=(8, 0), transformer_engine=HAVE, te_current_scaling=True)
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9.*this GPU is 8.0"):
        select_backends(BackendConfig(fp8="delayed"), CUDA, env=env)
    ada = select_backends(
        BackendConfig(fp8="delayed"), CUDA, env=gpu_env(capability=(8, 9), transformer_engine=HAVE)
    )
    assert (ada.linear, ada.fp8) == ("te", "delayed")


def test_fp8_recipes_and_config_checks():
    old_te = gpu_env(transformer_engine=HAVE, te_current_scaling=False)
    with pytest.raises(ConfigError, match="no Float8CurrentScaling recipe"):
        select_backends(BackendConfig(fp8="current"), CUDA, env=old_te)
    new_te = gpu_env(transformer_engine=HAVE, te_current_scaling=True)
    assert select_backends(BackendConfig(fp8="current"), CUDA, env=new_te).fp8 == "current"
    with pytest.raises(ConfigError, match="backend.fp8=delayed runs through Transformer Engine"):
        select_backends(BackendConfig(fp8="delayed", linear="torch"), CUDA, env=new_te)
    with pytest.raises(ConfigError, match="backend.attention='fast' is not one of auto, sdpa, flash"):
        BackendConfig(attention="fast").validate()


def test_rotary_and_cross_entropy_selection():
    env = gpu_env(flash_rotary=HAVE, flash_cross_entropy=HAVE, rotary_hook=False)
    choice = select_backends(BackendConfig(), CUDA, env=env)
    assert choice.cross_entropy == "flash"
    assert choice.rotary == "torch" and "no rotary_fn hook" in choice.reasons["rotary"]
    assert (
        select_backends(BackendConfig(), CUDA, env=gpu_env(flash_rotary=HAVE, rotary_hook=True)).rotary
        == "flash"
    )
    with pytest.raises(ConfigError, match="backend.cross_entropy=flash cannot run: no CUDA device"):
        select_backends(BackendConfig(cross_entropy="flash"), CPU, env=Environment(flash_cross_entropy=HAVE))


# --------------------------------------------------------------------------------------------- probing
class _BrokenFinder:
    """Import hook that makes `flash_attn` fail like a wheel built for another CUDA version."""

    def find_spec(self, name, path=None, target=None):
        if name == "flash_attn":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return None


def test_probe_reports_missing_present_and_broken(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # None: import raises ImportError
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    env = probe_environment(CPU)
    assert env.flash_attn == Library(None, "not installed") and not env.transformer_engine.ok
    assert env.rotary_hook == hasattr(Attention, "rotary_fn")

    fake = types.ModuleType("flash_attn")
    fake.__version__ = "2.7.4"
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert probe_environment(CPU).flash_attn == Library("2.7.4", "")

    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    broken = probe_environment(CPU).flash_attn
    assert not broken.ok and broken.problem.startswith("import failed: OSError: libcudart")


# --------------------------------------------------------------------------------------------- swaps
def test_probe_sees_the_fakes(fake_flash, fake_te):
    env = probe_environment(CPU)
    assert env.flash_attn.version == "2.7.4" and env.flash_rotary.ok and env.flash_cross_entropy.ok
    assert env.transformer_engine.version == "2.9.0" and env.te_current_scaling


def test_flash_attention_swap_matches_sdpa(fake_flash):
    model, x = build(), tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).float()
    choice = select_backends(BackendConfig(), CUDA, env=gpu_env(flash_attn=Library("2.7.4", "")))
    assert choice.attention == "flash2"
    names = [n for n, _ in model.named_parameters()]
    hook_calls = []  # parallel/ hooks the core (tensor-parallel RNG stream): the swap must keep them
    for module in model.modules():
        if isinstance(module, CoreAttention):
            module.register_forward_pre_hook(lambda mod, args: hook_calls.append(type(mod)))
    apply_kernels(model, choice)
    cores = [m for m in model.modules() if isinstance(m, CoreAttention)]
    assert len(cores) == TINY.num_layers and all(type(m) is FlashCoreAttention for m in cores)
    assert [n for n, _ in model.named_parameters()] == names
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x).float()
    assert len(fake_flash) == TINY.num_layers and hook_calls == [FlashCoreAttention] * TINY.num_layers
    # (B, T, H, hd) layout with the single KV head not repeated, causal, no copies made.
    assert fake_flash[0] == {"q": (2, 16, 4, 16), "k": (2, 16, 1, 16), "causal": True, "contiguous": True}
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)  # bf16 rounding of the probabilities


def test_flash_attention_falls_back_to_sdpa(fake_flash):
    """Masks (packed documents) and fp32 take the parent's SDPA path: bitwise the original model."""
    model, x = build(), tokens()
    segments = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(x, segment_ids=segments)
    plain = model(x)
    apply_kernels(model, BackendChoice(attention="flash2"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x, segment_ids=segments), packed)
    assert torch.equal(model(x), plain)
    assert fake_flash == []  # the kernel was never called: the fallback really ran


def test_te_linear_swap_keeps_names_and_logits(fake_te):
    model, x = build(), tokens()
    expected = model(x)
    state = model.state_dict()
    choice = select_backends(
        BackendConfig(fp8="delayed", fuse_norm=False), CUDA, env=gpu_env(transformer_engine=HAVE)
    )
    apply_kernels(model, choice)
    built = fake_te["modules"]
    assert [m["kind"] for m in built] == ["Linear"] * 4 * TINY.num_layers  # qkv, o, gate_up, down; no head
    assert all(m["bias"] is False and m["params_dtype"] == torch.float32 for m in built)
    assert all(m["parallel_mode"] is None and m["tp_group"] is None for m in built)
    assert type(model.layers["0"].attn.qkv_proj).__module__ == "fake_kernels"
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(model(x), expected)


def test_fp8_context_recipes_group_and_both_te_apis(fake_te, monkeypatch):
    with fp8_context(BackendChoice(linear="te", fp8="delayed"), group="stage-group"):
        pass
    (entry,) = fake_te["autocast"]
    assert entry["enabled"] and entry["group"] == "stage-group"
    recipe = entry["recipe"]
    assert (recipe.fp8_format.name, recipe.amax_history_len, recipe.amax_compute_algo) == (
        "HYBRID",
        16,
        "max",
    )
    with fp8_context(BackendChoice(linear="te", fp8="current")):
        pass
    assert type(fake_te["autocast"][-1]["recipe"]).__name__ == "Float8CurrentScaling"
    assert isinstance(fp8_context(BackendChoice()), contextlib.nullcontext)
    monkeypatch.delattr(sys.modules["transformer_engine.pytorch"], "autocast")  # TE < 2.9
    with fp8_context(BackendChoice(linear="te", fp8="delayed"), group="stage-group"):
        pass
    assert fake_te["autocast"][-2:] == [
        {"api": "fp8_autocast"},
        {**entry, "recipe": fake_te["autocast"][-1]["recipe"]},
    ]


def test_fp8_shapes_are_a_layout_rule(fake_te):
    """The swap takes any shape (BF16 TE has no limit); FP8 shapes are refused by plan_layout, naming
    the field (tests/test_te_layers.py), and a model that bypassed it by TE at its first FP8 GEMM."""
    odd = ModelConfig(
        vocab_size=64, hidden_size=40, num_layers=1, num_heads=2, head_dim=20, ffn_hidden_size=60
    )
    model = apply_kernels(build(odd), BackendChoice(linear="te", fp8="delayed"))
    model(tokens(odd))
    fp8 = fp8_context(BackendChoice(linear="te", fp8="delayed"))
    with fp8, pytest.raises(ValueError, match="FP8 execution requires .* divisible by 16"):
        model(tokens(odd))


def test_fused_cross_entropy_matches_plain(fake_flash):
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 96, requires_grad=True)
    labels = torch.randint(0, 96, (2, 8))
    mask = (torch.rand(2, 8) > 0.3).float()
    single = ParallelContext.single()
    fused = build_loss_fn(single, BackendChoice(cross_entropy="flash"), real_vocab_size=None)
    assert build_loss_fn(single, BackendChoice(), None).func is language_model_loss
    total, parts = fused(logits, labels, mask, z_loss=1e-2)
    (grad,) = torch.autograd.grad(total, logits)
    ref_total, ref_parts = language_model_loss(logits, labels, mask, z_loss=1e-2)
    (ref_grad,) = torch.autograd.grad(ref_total, logits)
    assert fake_flash == [{"ce": (16, 96), "dtype": torch.float32}]
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(parts["lm_loss"], ref_parts["lm_loss"])
    torch.testing.assert_close(parts["z_loss"], ref_parts["z_loss"])
    torch.testing.assert_close(grad, ref_grad)


def test_fused_cross_entropy_masks_vocabulary_padding(fake_flash):
    """Logits of 96 ids of which the tokenizer has 80: both losses equal the loss on the 80 alone."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 96)
    logits[..., 80:] += 5.0  # padding that would dominate the softmax if it were counted
    logits.requires_grad_(True)
    labels = torch.randint(0, 80, (2, 8))
    real = language_model_loss(logits[..., :80], labels, z_loss=1e-2)[0]
    for choice in (BackendChoice(cross_entropy="flash"), BackendChoice()):
        total, _ = build_loss_fn(ParallelContext.single(), choice, real_vocab_size=80)(
            logits, labels, z_loss=1e-2
        )
        torch.testing.assert_close(total, real)
        (grad,) = torch.autograd.grad(total, logits)
        assert not grad[..., 80:].any()


@pytest.mark.parametrize("interleaved", [True, False])
def test_fused_rotary_matches_torch(fake_flash, interleaved):
    from megatron_andromeda.models.rotary import RotaryEmbedding

    rope = RotaryEmbedding(16, 32, interleaved=interleaved)
    x = torch.randn(2, 12, 3, 16)
    cos, sin = rope(None, 12)  # (T, 1, d/2)
    fused = kernels.flash_rotary_fn()
    torch.testing.assert_close(fused(x, cos, sin, interleaved), apply_rotary(x, cos, sin, interleaved))
    assert fake_flash == [{"rotary": (12, 8), "interleaved": interleaved}]
    per_sample = rope(torch.arange(12).repeat(2, 1), 12)  # (B, T, 1, d/2): the torch path
    torch.testing.assert_close(fused(x, *per_sample, interleaved), apply_rotary(x, *per_sample, interleaved))
    assert len(fake_flash) == 1


def test_rotary_swap_sets_the_hook(fake_flash):
    model = apply_kernels(build(), BackendChoice(rotary="flash"))
    hooks = {m.rotary_fn.__qualname__ for m in model.modules() if isinstance(m, Attention)}
    assert hooks == {"flash_rotary_fn.<locals>.fused"}


def test_fused_rotary_runs_inside_the_model(fake_flash):
    model, x = build(), tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).float()
        got = apply_kernels(model, BackendChoice(rotary="flash"))(x).float()
    assert [c["rotary"] for c in fake_flash] == [(16, 8)] * (2 * TINY.num_layers)  # q and k of each layer
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


def test_compile_each_block_keeps_names_and_logits():
    model, x = build(), tokens()
    expected, names = model(x), list(model.state_dict())
    compile_blocks(model, "eager")  # inductor: see the GPU test
    assert all(block._compiled_call_impl is not None for block in model.layers.values())
    assert list(model.state_dict()) == names
    torch.testing.assert_close(model(x), expected)


def test_plain_choice_changes_nothing():
    model, x = build(), tokens()
    before = [type(m) for m in model.modules()]
    expected = model(x)
    apply_kernels(model, select_backends(BackendConfig(), CPU, env=Environment()))
    assert [type(m) for m in model.modules()] == before
    assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_MODEL = ModelConfig(**{**_SHAPE, "vocab_size": 4096, "hidden_size": 512, "num_heads": 8, "head_dim": 64})


def _bf16_errors(choice: BackendChoice, compile_backend: str = "inductor") -> tuple[float, float]:
    """Max logit error vs fp32 of the plain bf16 path and of the backend's bf16 path."""
    torch.manual_seed(0)
    model = GPTModel(GPU_MODEL).cuda()
    x = torch.randint(0, GPU_MODEL.vocab_size, (4, 512), device="cuda")
    with torch.no_grad():
        reference = model(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plain = model(x).float()
        apply_kernels(model, choice)
        if choice.compile:
            compile_blocks(model, compile_backend)
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8_context(choice):
            fused = model(x).float()
    return (plain - reference).abs().max().item(), (fused - reference).abs().max().item()


def _require(env_ok: bool, what: str) -> None:
    if not env_ok:
        pytest.skip(f"{what} is not installed on this GPU machine")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["flash", "te", "compile"])
def test_gpu_backend_matches_plain_within_bf16(name):
    env = probe_environment(CUDA)
    if name == "flash":
        _require(env.flash_attn.ok or env.flash_attn_3.ok, "flash-attn")
        choice = select_backends(BackendConfig(attention="flash", linear="torch"), CUDA, env=env)
    elif name == "te":
        _require(env.transformer_engine.ok, "Transformer Engine")
        choice = BackendChoice(linear="te")
    else:
        choice = BackendChoice(compile=True)
    plain_err, fused_err = _bf16_errors(choice)
    assert fused_err <= 2 * plain_err + 1e-2, (plain_err, fused_err)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp8_stays_close():
    env = probe_environment(CUDA)
    _require(env.transformer_engine.ok, "Transformer Engine")
    if env.capability < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    plain_err, fp8_err = _bf16_errors(BackendChoice(linear="te", fp8="delayed"))
    assert fp8_err <= 8 * plain_err + 5e-2, (plain_err, fp8_err)  # FP8 (E4M3) has 3 mantissa bits


@pytest.mark.gpu
@needs_gpu
def test_gpu_fused_cross_entropy_matches():
    _require(probe_environment(CUDA).flash_cross_entropy.ok, "flash-attn's cross-entropy")
    logits = torch.randn(4096, 50304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50304, (4096,), device="cuda")
    fused_loss = make_loss_fn(ParallelContext.single(), fused=fused_cross_entropy())
    fused, _ = fused_loss(logits, labels, z_loss=1e-4)
    plain, _ = language_model_loss(logits, labels, z_loss=1e-4)
    torch.testing.assert_close(fused, plain, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_gpu
def test_gpu_probe_matches_the_device():
    env = probe_environment(CUDA)
    assert env.capability == torch.cuda.get_device_capability(0)
    choice = select_backends(BackendConfig(), CUDA, env=env)
    assert choice.attention in ("sdpa", "flash2", "flash3") and choice.describe().startswith("attention=")


# --------------------------------------------------------------------------------------------- benchmark
def test_gpu_throughput_smoke_runs_on_cpu(tmp_path, capsys, monkeypatch):
    """The GPU benchmark's --smoke mode: tiny model, real steps, the table and the JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
    spec = importlib.util.spec_from_file_location("gpu_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_throughput", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "throughput.json"
    rows = bench.main(["--smoke", "--json", str(out)])
    ran = [r for r in rows if r.status == "ok"]
    assert [r.variant for r in ran] == ["bf16-sdpa"]
    assert ran[0].tokens_per_s > 0 and ran[0].vs_reference == 1.0 and ran[0].mfu is None
    skipped = {r.variant: r.status for r in rows if r.status != "ok"}
    assert skipped["bf16-flash"].startswith("skipped: backend.attention=flash cannot run: no CUDA device")
    assert "Transformer Engine" in skipped["fp8-delayed"]
    payload = json.loads(out.read_text())
    assert len(payload["rows"]) == len(rows) and payload["environment"]["device"] == "cpu"
    assert "smoke            bf16-sdpa" in capsys.readouterr().out
