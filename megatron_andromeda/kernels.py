"""Kernels, chosen in one place: attention, linear layers / FP8, rotary, cross-entropy, compile.

Three steps, each testable on its own:

1. `probe_environment(device)` imports the optional libraries (flash-attn 2 or 3, Transformer
   Engine) and reads the GPU's compute capability;
2. `select_backends(cfg, env)` is pure: it turns the `backend` config section and the probe into a
   `BackendChoice` with a reason per decision (logged at start-up as `choice.describe()`, e.g.
   `attention=sdpa (flash-attn not installed)`). What was asked for explicitly and cannot run is an
   error, never a silent fallback; `auto` falls back and says why;
3. `apply_kernels(model, choice)` swaps modules of a GPTModel (or of every chunk of a pipeline
   stage) in place, parameter names unchanged, at any tensor-parallel degree (the Transformer
   Engine modules and their communication contract: te_layers.py); `compile_blocks(model)`
   compiles each block; `fp8_context(choice, group)` wraps the forward pass and
   `fused_cross_entropy()` gives the fused loss. `megatron_andromeda.builder` calls them in the one
   documented order.

Every path computes the same function as the plain one (SDPA, nn.Linear, torch rotary and
cross-entropy) within bf16 tolerance; the GPU tests in tests/test_kernels.py and
tests/test_te_layers.py check it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_andromeda.config import BackendConfig
from megatron_andromeda.errors import ConfigError
from megatron_andromeda.models.attention import Attention, AttentionInputs, CoreAttention
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.models.rotary import apply_rotary
from megatron_andromeda.te_layers import swap_block_linears

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
FLASH2_MIN_CAPABILITY = (8, 0)  # Ampere
FLASH3_CAPABILITY = 9  # Hopper only
FLASH_MAX_HEAD_DIM = 256
HALF_TYPES = (torch.float16, torch.bfloat16)
# Devices the fused kernels run on; tests add "cpu" to drive the kernel paths (and their selection)
# with the fake libraries of tests/fake_kernels.py.
KERNEL_DEVICES: tuple[str, ...] = ("cuda",)


# --------------------------------------------------------------------------------------------- config
# --------------------------------------------------------------------------------------------- probing
@dataclass(frozen=True)
class Library:
    """An optional import: its version when importable, else why not."""

    version: str | None = None
    problem: str = "not installed"

    @property
    def ok(self) -> bool:
        return self.version is not None


@dataclass(frozen=True)
class Environment:
    """What `select_backends` decides from: the device and the importable libraries."""

    device_type: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    flash_attn: Library = Library()  # flash-attn 2: flash_attn.flash_attn_func
    flash_attn_3: Library = Library()  # flash-attn 3 (Hopper): flash_attn_interface.flash_attn_func
    flash_rotary: Library = Library()  # flash_attn.layers.rotary.apply_rotary_emb
    flash_cross_entropy: Library = Library()  # flash_attn.ops.triton.cross_entropy.cross_entropy_loss
    transformer_engine: Library = Library()  # transformer_engine.pytorch
    te_current_scaling: bool = False  # TE has the Float8CurrentScaling recipe (TE >= 2.2)
    rotary_hook: bool = False  # models' Attention routes rotary through `self.rotary_fn`


def probe_library(module: str) -> Library:
    """Import `module`; a broken install (e.g. a CUDA library mismatch) is reported, not raised."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return Library(None, "not installed")
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable", with the reason
        return Library(None, f"import failed: {type(err).__name__}: {err}")
    root = importlib.import_module(module.split(".")[0])
    return Library(str(getattr(mod, "__version__", getattr(root, "__version__", "unknown"))), "")


def probe_environment(device: torch.device) -> Environment:
    capability = None
    if device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(device))
    te = probe_library("transformer_engine.pytorch")
    current = False
    if te.ok:
        current = hasattr(importlib.import_module("transformer_engine.common.recipe"), "Float8CurrentScaling")
    return Environment(
        device_type=device.type,
        capability=capability,
        flash_attn=probe_library("flash_attn"),
        flash_attn_3=probe_library("flash_attn_interface"),
        flash_rotary=probe_library("flash_attn.layers.rotary"),
        flash_cross_entropy=probe_library("flash_attn.ops.triton.cross_entropy"),
        transformer_engine=te,
        te_current_scaling=current,
        rotary_hook=hasattr(Attention, "rotary_fn"),
    )


# --------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class BackendChoice:
    attention: str = "sdpa"  # "sdpa", "flash2", "flash3"
    linear: str = "torch"  # "torch", "te"
    fp8: str = "none"  # "none", "delayed", "current"
    rotary: str = "torch"  # "torch", "flash"
    cross_entropy: str = "torch"  # "torch", "flash"
    compile: bool = False
    fuse_norm: bool = False  # with linear="te": norms fused into TE LayerNormLinear
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        """One line for the start-up log: `attention=sdpa (flash-attn not installed), linear=...`."""
        parts = []
        for name in ("attention", "linear", "fp8", "rotary", "cross_entropy", "compile"):
            value = getattr(self, name)
            value = ("on" if value else "off") if isinstance(value, bool) else value
            reason = self.reasons.get(name)
            parts.append(f"{name}={value} ({reason})" if reason else f"{name}={value}")
        return ", ".join(parts)


def select_backends(
    cfg: BackendConfig,
    device: torch.device,
    *,
    precision: str = "bf16",
    env: Environment | None = None,
) -> BackendChoice:
    """Decide every backend from the config and the environment (probed on `device` unless given).

    With `env` given this is pure: no imports, no GPU; that is how the tests drive it.
    """
    cfg.validate()
    env = probe_environment(device) if env is None else env
    attention, attention_why = _select_attention(cfg.attention, env, precision)
    linear, linear_why = _select_linear(cfg, env)
    fp8, fp8_why = _select_fp8(cfg.fp8, linear, env)
    rotary, rotary_why = _select_flash_op("rotary", cfg.rotary, env, env.flash_rotary, hook=env.rotary_hook)
    ce, ce_why = _select_flash_op("cross_entropy", cfg.cross_entropy, env, env.flash_cross_entropy)
    reasons = {
        "attention": attention_why,
        "linear": linear_why,
        "fp8": fp8_why,
        "rotary": rotary_why,
        "cross_entropy": ce_why,
        "compile": "each transformer block" if cfg.compile else "",
    }
    fuse_norm = linear == "te" and cfg.fuse_norm
    if fuse_norm:
        reasons["linear"] += "; norms fused into LayerNormLinear"
    return BackendChoice(
        attention, linear, fp8, rotary, ce, cfg.compile, fuse_norm, {k: v for k, v in reasons.items() if v}
    )


def _select_attention(asked: str, env: Environment, precision: str) -> tuple[str, str]:
    if asked == "sdpa":
        return "sdpa", "asked for"
    blocker = _flash_blocker(env, precision)
    if blocker is None:
        major = env.capability[0]
        if env.flash_attn_3.ok and major == FLASH3_CAPABILITY:
            return "flash3", f"flash-attn 3 {env.flash_attn_3.version}"
        return "flash2", f"flash-attn {env.flash_attn.version}"
    if asked == "flash":
        raise ConfigError(
            f"backend.attention=flash cannot run: {blocker}; use backend.attention=sdpa or auto"
        )
    kernels = "its flash / cuDNN kernels" if env.device_type == "cuda" else "its CPU kernels"
    return "sdpa", f"{blocker}; torch picks {kernels}"


def _flash_blocker(env: Environment, precision: str) -> str | None:
    """Why flash-attn cannot be used here, or None when it can."""
    if env.device_type != "cuda":
        return "no CUDA device"
    hopper = env.capability[0] == FLASH3_CAPABILITY
    if not env.flash_attn.ok and not (env.flash_attn_3.ok and hopper):
        return f"flash-attn {env.flash_attn.problem}"
    if env.capability < FLASH2_MIN_CAPABILITY:
        return f"flash-attn needs compute capability >= 8.0, this GPU is {_cc(env.capability)}"
    if precision not in ("bf16", "fp16"):
        return f"train.precision={precision} (flash-attn runs bf16 / fp16 only)"
    return None


def _select_linear(cfg: BackendConfig, env: Environment) -> tuple[str, str]:
    """Transformer Engine at any tensor-parallel degree (te_layers.py): it needs only the library and CUDA."""
    te = env.transformer_engine
    if cfg.linear == "torch":
        return "torch", "asked for"
    blocker = None
    if not te.ok:
        blocker = f"transformer-engine {te.problem}"
    elif env.device_type not in KERNEL_DEVICES:
        blocker = "no CUDA device"
    if blocker is None:
        return "te", f"transformer-engine {te.version}"
    if cfg.linear == "te" or cfg.fp8 != "none":
        what = "backend.linear=te" if cfg.linear == "te" else f"backend.fp8={cfg.fp8}"
        raise ConfigError(
            f"{what} needs Transformer Engine on a CUDA device but {blocker}; install it "
            "(pip install 'transformer-engine[pytorch]') or set backend.linear=torch backend.fp8=none"
        )
    return "torch", blocker


def _select_fp8(asked: str, linear: str, env: Environment) -> tuple[str, str]:
    if asked == "none":
        return "none", ""
    assert linear == "te"  # _select_linear raised otherwise
    if env.device_type == "cuda" and env.capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"backend.fp8={asked} needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper), this GPU "
            f"is {_cc(env.capability)}; set backend.fp8=none to train in BF16"
        )
    if asked == "current" and not env.te_current_scaling:
        raise ConfigError(
            f"backend.fp8=current: Transformer Engine {env.transformer_engine.version} has no "
            "Float8CurrentScaling recipe (TE >= 2.2); use backend.fp8=delayed or upgrade TE"
        )
    return asked, f"{asked} scaling, HYBRID format (E4M3 forward, E5M2 gradients)"


def _select_flash_op(
    name: str, asked: str, env: Environment, lib: Library, hook: bool = True
) -> tuple[str, str]:
    if asked == "torch":
        return "torch", "asked for"
    blocker = None
    if not lib.ok:
        blocker = f"flash-attn {lib.problem}"
    elif env.device_type != "cuda":
        blocker = "no CUDA device"
    elif not hook:
        blocker = "models.attention.Attention has no rotary_fn hook"
    if blocker is None:
        return "flash", f"flash-attn {lib.version} Triton kernel"
    if asked == "flash":
        raise ConfigError(f"backend.{name}=flash cannot run: {blocker}; use backend.{name}=torch or auto")
    return "torch", blocker


def _cc(capability: tuple[int, int] | None) -> str:
    return "none" if capability is None else f"{capability[0]}.{capability[1]}"


# --------------------------------------------------------------------------------------------- modules
class FlashCoreAttention(CoreAttention):
    """CoreAttention through flash-attn: (B, T, H, hd) layout, KV heads shared without repeating them.

    Falls back to SDPA (the parent) for what the kernel cannot express: explicit masks and ALiBi
    biases (packed documents, decoding several tokens with a cache), fp32 inputs, non-CUDA tensors,
    head dimensions above 256, and dropout on flash-attn 3.
    """

    def __init__(self, dropout: float, kernel: Callable[..., torch.Tensor], supports_dropout: bool = True):
        super().__init__(dropout)
        self.kernel = kernel
        self.supports_dropout = supports_dropout

    @classmethod
    def convert(
        cls, core: CoreAttention, kernel: Callable[..., torch.Tensor], supports_dropout: bool
    ) -> None:
        """Turn `core` into a FlashCoreAttention in place, keeping the hooks others registered on it
        (parallel/ runs the core in the tensor-parallel RNG stream through a hook pair)."""
        core.__class__ = cls
        core.kernel = kernel
        core.supports_dropout = supports_dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
    ) -> torch.Tensor:
        # q: (B, H, Tq, hd); k, v: (B, kvH, Tk, hd)
        dropout = self.dropout if self.training else 0.0
        if not self._applies(q, k, inputs, dropout):
            return super().forward(q, k, v, inputs)
        # The transposes undo Attention's (B, T, H, hd) -> (B, H, T, hd) views: no copies.
        out = self.kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, inputs.is_causal)
        return out.transpose(1, 2)  # (B, H, Tq, hd)

    def _applies(self, q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs, dropout: float) -> bool:
        return (
            inputs.mask is None
            and inputs.bias is None
            and q.device.type in KERNEL_DEVICES
            and q.dtype in HALF_TYPES
            and q.shape[-1] <= FLASH_MAX_HEAD_DIM
            and not (inputs.is_causal and q.shape[2] != k.shape[2])  # flash aligns causal masks bottom-right
            and (dropout == 0.0 or self.supports_dropout)
        )


def flash_kernel(version: str) -> tuple[Callable[..., torch.Tensor], bool]:
    """(kernel(q, k, v, dropout, causal) on (B, T, H, hd) tensors, whether it supports dropout)."""
    if version == "flash3":
        fa3 = importlib.import_module("flash_attn_interface")

        def kernel3(q, k, v, dropout, causal):
            out = fa3.flash_attn_func(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE

        return kernel3, False
    fa2 = importlib.import_module("flash_attn")

    def kernel2(q, k, v, dropout, causal):
        return fa2.flash_attn_func(q, k, v, dropout_p=dropout, causal=causal)

    return kernel2, True


def flash_rotary_fn() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]:
    """A drop-in for `models.rotary.apply_rotary` running flash-attn's Triton kernel.

    The kernel takes tables of shape (T, d/2); per-sample positions ((B, T, 1, d/2) tables) and
    non-CUDA tensors take the torch path.
    """
    rotary = importlib.import_module("flash_attn.layers.rotary")

    def fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        if cos.dim() != 3 or x.device.type not in KERNEL_DEVICES:
            return apply_rotary(x, cos, sin, interleaved)
        cos2 = cos[:, 0, :].to(x.dtype).contiguous()  # (T, d/2)
        sin2 = sin[:, 0, :].to(x.dtype).contiguous()
        return rotary.apply_rotary_emb(x, cos2, sin2, interleaved=interleaved)

    return fused


def _blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The transformer blocks of a GPTModel, or of every GPTModel chunk inside `model` (interleaving)."""
    chunks = [m for m in model.modules() if isinstance(m, GPTModel)]
    if not chunks:
        raise TypeError(f"expected a GPTModel or a list of GPTModel chunks, got {type(model).__name__}")
    for chunk in chunks:
        yield from chunk.layers.values()


def apply_kernels(model: nn.Module, choice: BackendChoice) -> nn.Module:
    """Swap the chosen kernels into `model` in place and return it; parameter names are unchanged.

    `model` is a GPTModel or a pipeline stage's chunks. Call it after tensor parallelism (which
    replaces the linear layers with its own) and with the model on its device, before
    recomputation and compile (megatron_andromeda.builder does). With `choice.linear == "te"` every
    block GEMM becomes a Transformer Engine module holding the shard tensor parallelism left
    (te_layers.py); the shapes FP8 needs are a layout rule (parallel.layout.check_fp8, applied by
    plan_layout before any process group). The output head stays a plain matmul even with FP8, as
    is usual: its precision matters most for the loss.
    """
    blocks = list(_blocks(model))
    if choice.attention != "sdpa":
        kernel, dropout_ok = flash_kernel(choice.attention)
        for module in model.modules():
            if type(module) is CoreAttention:
                FlashCoreAttention.convert(module, kernel, dropout_ok)
    if choice.rotary == "flash":
        fused = flash_rotary_fn()
        for module in model.modules():
            if isinstance(module, Attention):
                module.rotary_fn = fused
    if choice.linear == "te":
        te = importlib.import_module("transformer_engine.pytorch")
        for block in blocks:
            swap_block_linears(block, te, fuse_norm=choice.fuse_norm)
    return model


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each transformer block in place (parameter names keep no `_orig_mod.` prefix).

    Per block rather than the whole model: pipeline stages, recomputation wrappers and the
    trainer's hooks stay plain Python, and one compiled graph serves every identical block.
    """
    for block in _blocks(model):
        block.compile(backend=backend)
    return model


# --------------------------------------------------------------------------------------------- step helpers
def make_fp8_recipe(kind: str):
    recipe = importlib.import_module("transformer_engine.common.recipe")
    if kind == "delayed":
        return recipe.DelayedScaling(
            fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"
        )
    return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)


def fp8_context(choice: BackendChoice, group=None) -> contextlib.AbstractContextManager:
    """Wrap the forward pass (not the backward) of a micro-batch; a no-op without FP8.

    `group` is where delayed scaling reduces its amaxes when the context exits: the tensor x data
    ranks of this pipeline stage (`ParallelContext.stage_group`; None in one process). TE all-reduces
    one buffer holding the amax of every FP8 module that ran in the context, so the group's ranks
    must run the same modules in the same order: never ranks of other pipeline stages, which hold
    other layers (TE's default, the whole world, would mix them). Reducing over the tensor ranks
    gives every shard of a weight the same scale, as one unsharded FP8 GEMM would have; over the
    data ranks, the same scales everywhere. Current scaling computes each scale from the tensor at
    hand and ignores the group.

    TE >= 2.9 calls the context `te.autocast(recipe=, amax_reduction_group=)`; older releases
    `te.fp8_autocast(fp8_recipe=, fp8_group=)` (deprecated since).
    """
    if choice.fp8 == "none":
        return contextlib.nullcontext()
    te = importlib.import_module("transformer_engine.pytorch")
    recipe = make_fp8_recipe(choice.fp8)
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def fused_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]:
    """flash-attn's Triton cross-entropy as `(logits (N, V), labels (N,), z_loss) -> (ce, lse^2)` per token.

    The kernel reads half-precision logits directly (no (N, V) fp32 copy) and folds z_loss * lse^2
    into the loss it differentiates; the returned `ce` carries that combined gradient and `lse^2` is
    detached, so `models.gpt.reduce_token_losses(ce, ..., lse_squared, z_loss)` gives the same value
    and gradient as the plain loss.
    """
    ce_kernel = importlib.import_module("flash_attn.ops.triton.cross_entropy")

    def per_token(flat_logits, flat_labels, z_loss):
        losses, z_losses = ce_kernel.cross_entropy_loss(flat_logits, flat_labels, lse_square_scale=z_loss)
        z_part = z_losses.detach()
        lse_squared = z_part / z_loss if z_loss > 0 else None
        return losses - z_part, lse_squared

    return per_token


__all__ = [
    "BackendChoice",
    "BackendConfig",
    "Environment",
    "FlashCoreAttention",
    "Library",
    "apply_kernels",
    "compile_blocks",
    "fp8_context",
    "fused_cross_entropy",
    "probe_environment",
    "select_backends",
]
