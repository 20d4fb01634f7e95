"""Fake flash-attn and Transformer Engine libraries for CPU tests (pytest fixtures).

Each fake is installed in `sys.modules` for one test: its kernels compute the reference math and
record their calls, so the code paths that import and call the real libraries run on a CPU and the
tests can count what was called. Both fixtures also let the kernel paths (and kernel selection)
accept CPU tensors. Spawned ranks install the Transformer Engine fake themselves
(`install_fake_te`); the GPU tests compare its signatures with the real library's.
"""

from __future__ import annotations

import contextlib
import enum
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_andromeda import kernels
from megatron_andromeda.parallel import mappings


def reference_attention(q, k, v, causal):
    """Attention on (B, T, H, hd) tensors, computed in fp32 the textbook way."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2).float(), v.repeat_interleave(groups, dim=2).float()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[1]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).to(q.dtype)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attn with a recording flash_attn_func, a rotary kernel and a cross-entropy kernel."""
    calls: list[dict] = []
    root = types.ModuleType("flash_attn")
    root.__version__ = "2.7.4"

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        calls.append(
            {"q": tuple(q.shape), "k": tuple(k.shape), "causal": causal, "contiguous": q.is_contiguous()}
        )
        return reference_attention(q, k, v, causal)

    def apply_rotary_emb(x, cos, sin, interleaved=False):
        calls.append({"rotary": tuple(cos.shape), "interleaved": interleaved})
        d = cos.shape[-1]
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, d/2) over (B, T, H, d/2)
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d], x[..., d:])
        r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        return torch.stack((r1, r2), -1).flatten(-2) if interleaved else torch.cat((r1, r2), -1)

    def cross_entropy_loss(logits, labels, lse_square_scale=0.0):
        calls.append({"ce": tuple(logits.shape), "dtype": logits.dtype})
        lse = torch.logsumexp(logits.float(), dim=-1)
        z = lse_square_scale * lse.square()
        return lse - logits.float().gather(1, labels[:, None])[:, 0] + z, z.detach()

    root.flash_attn_func = flash_attn_func
    rotary = types.ModuleType("flash_attn.layers.rotary")
    rotary.apply_rotary_emb = apply_rotary_emb
    ce = types.ModuleType("flash_attn.ops.triton.cross_entropy")
    ce.cross_entropy_loss = cross_entropy_loss
    for name, module in (
        ("flash_attn", root),
        ("flash_attn.layers.rotary", rotary),
        ("flash_attn.ops.triton.cross_entropy", ce),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", ("cuda", "cpu"))  # let the kernels see CPU tensors
    return calls


# --------------------------------------------------------------------------------------- Transformer Engine
@pytest.fixture
def fake_te(monkeypatch):
    """transformer_engine with recording Linear / LayerNormLinear / autocast; kernels accept CPU tensors."""
    return install_fake_te(monkeypatch)


def install_fake_te(monkeypatch, *, version: str = "2.9.0", new_autocast: bool = True) -> dict[str, list]:
    """Put a fake `transformer_engine` into sys.modules (through `monkeypatch`) and return its log.

    Spawned ranks call it themselves, inside `pytest.MonkeyPatch.context()`. The log holds:
    "modules" (one dict of constructor arguments per module built), "calls" (one per forward: the
    kind, input shape, parallel mode, whether FP8 was on, the GEMM's weight), "autocast" (one per
    context entered: enabled, the recipe, the group's ranks) and "set_extra_state" (loads of FP8
    metadata). `new_autocast=False` gives a TE before 2.9, with `fp8_autocast` only.
    """
    log: dict[str, list] = {"modules": [], "calls": [], "autocast": [], "set_extra_state": []}
    state = {"fp8": None}  # the recipe while a fake autocast is active
    recipe = _fake_recipe_module()
    pytorch_mod = types.ModuleType("transformer_engine.pytorch")
    pytorch_mod.Linear, pytorch_mod.LayerNormLinear = _fake_te_modules(log, state)

    @contextlib.contextmanager
    def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None, _graph=False):
        log["autocast"].append({"enabled": enabled, "recipe": recipe, "group": _ranks(amax_reduction_group)})
        outer, state["fp8"] = state["fp8"], recipe if enabled else None
        try:
            yield
        finally:
            state["fp8"] = outer

    def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None, _graph=False):
        log["autocast"].append({"api": "fp8_autocast"})
        return autocast(enabled, calibrating, fp8_recipe, fp8_group, _graph)

    pytorch_mod.fp8_autocast = fp8_autocast
    if new_autocast:
        pytorch_mod.autocast = autocast
    root = types.ModuleType("transformer_engine")
    root.__version__ = version
    for name, module in (
        ("transformer_engine", root),
        ("transformer_engine.pytorch", pytorch_mod),
        ("transformer_engine.common.recipe", recipe),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", ("cuda", "cpu"))  # let the kernels see CPU tensors
    return log


def _ranks(group):
    """A process group as its global ranks (picklable, comparable); anything else as it is."""
    return dist.get_process_group_ranks(group) if isinstance(group, dist.ProcessGroup) else group


def _fake_recipe_module() -> types.ModuleType:
    class Format(enum.Enum):
        E4M3 = "e4m3"
        E5M2 = "e5m2"
        HYBRID = "hybrid"

    @dataclass
    class DelayedScaling:
        margin: int = 0
        fp8_format: Format = Format.HYBRID
        amax_history_len: int = 1024
        amax_compute_algo: str = "max"
        scaling_factor_compute_algo: object = None
        reduce_amax: bool = True

    @dataclass
    class Float8CurrentScaling:
        fp8_format: Format = Format.HYBRID

    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format, recipe.DelayedScaling, recipe.Float8CurrentScaling = (
        Format,
        DelayedScaling,
        Float8CurrentScaling,
    )
    return recipe


def _fake_te_modules(log: dict[str, list], state: dict) -> tuple[type, type]:
    """Linear and LayerNormLinear with TE 2.x's constructor signatures and forward semantics.

    Faithful where our code depends on it: `parallel_mode` "column" / "row" divide out / in
    features by the tensor degree and communicate along the FIRST dimension (TE's sequence-first
    layout: column + sequence_parallel all-gathers the input, row reduce-scatters the output;
    without sequence parallelism column's backward and row's forward all-reduce); None communicates
    nothing. Inputs must be on a kernel device; outside torch.autocast the parameters' dtype must
    be the input's; under FP8 the GEMM shapes must pass TE's check. bias=False leaves an empty
    `bias` tensor attribute; LayerNorm always has a `layer_norm_bias` parameter; `_extra_state` is
    empty until FP8 was used, then a byte tensor. The math is plain torch in the activation dtype.
    """

    class _Base(nn.Module):
        def _setup(self, kind, in_features, out_features, sequence_parallel, tp_group, tp_size,
                   bias, params_dtype, parallel_mode, device, **record):  # fmt: skip
            if parallel_mode not in (None, "column", "row"):
                raise AssertionError(f"parallel_mode {parallel_mode} not supported")
            self.tp_group = tp_group
            self.tp_size = tp_size if tp_group is None else dist.get_world_size(tp_group)
            self.parallel_mode = parallel_mode
            self.sequence_parallel = self.tp_size > 1 and sequence_parallel
            if parallel_mode == "column":
                out_features //= self.tp_size
            elif parallel_mode == "row":
                in_features //= self.tp_size
            self.in_features, self.out_features = in_features, out_features
            dtype = params_dtype or torch.get_default_dtype()
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
            nn.init.normal_(self.weight, 0.0, 0.023)  # TE's default init draws from the global generator
            self.bias = (
                nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                if bias
                else torch.Tensor().to(dtype=dtype, device=device)
            )
            self.use_bias = bias
            self.fp8_used = False
            log["modules"].append(
                {"kind": kind, "in_features": in_features, "out_features": out_features, "bias": bias,
                 "params_dtype": params_dtype, "device": torch.device(device), "parallel_mode": parallel_mode,
                 "tp_group": tp_group, "sequence_parallel": sequence_parallel, **record}
            )  # fmt: skip

        def _prepare(self, inp: torch.Tensor) -> torch.dtype:
            """TE's prepare_forward: device, tensor group and dtype checks; returns the activation dtype."""
            if inp.device.type not in kernels.KERNEL_DEVICES:
                raise RuntimeError(f"TransformerEngine needs CUDA. Got input on device: {inp.device}")
            if torch.is_autocast_enabled(inp.device.type):
                return torch.get_autocast_dtype(inp.device.type)
            for name, param in self.named_parameters():
                if param.dtype != inp.dtype:
                    raise TypeError(
                        "Data types for parameters must match when outside of autocasted region. "
                        f"Found input dtype: {inp.dtype} and {name!r} dtype: {param.dtype}"
                    )
            return inp.dtype

        def _gemm(self, x: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
            fp8 = state["fp8"] is not None
            if fp8:
                self.fp8_used = True
                _assert_dim_for_fp8_exec(x, self.weight)
            log["calls"].append(
                {"kind": kind, "shape": tuple(x.shape), "parallel_mode": self.parallel_mode, "fp8": fp8,
                 "weight": self.weight, "dtype": dtype}
            )  # fmt: skip
            if self.parallel_mode == "column":
                x = self._enter(x)
            y = F.linear(x.to(dtype), self.weight.to(dtype))
            if self.parallel_mode == "row":
                y = self._leave(y)
            if self.use_bias:
                y = y + self.bias.to(dtype)
            return y

        def _enter(self, x):
            if self.sequence_parallel:  # TE gathers along dim 0: the sequence in (T, B, D)
                return mappings._Gather.apply(x.contiguous(), self.tp_group, 0, True)
            return mappings.copy_to_tensor_parallel_region(x, self.tp_group)

        def _leave(self, y):
            if self.sequence_parallel:
                return mappings._ReduceScatter.apply(y, self.tp_group, 0)
            return mappings.reduce_from_tensor_parallel_region(y, self.tp_group)

        def get_extra_state(self) -> torch.Tensor:
            if not self.fp8_used:
                return torch.empty(0, dtype=torch.uint8)
            return torch.tensor(list(b"pickled FP8 scaling metadata"), dtype=torch.uint8)

        def set_extra_state(self, extra: torch.Tensor) -> None:
            log["set_extra_state"].append(extra)

    class Linear(_Base):
        def __init__(
            self, in_features, out_features, sequence_parallel=False, fuse_wgrad_accumulation=False,
            tp_group=None, tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None, init_method=None,
            bias=True, return_bias=False, params_dtype=None, parallel_mode=None, parameters_split=None,
            device="cuda", ub_overlap_ag=False, ub_overlap_rs=False, ub_overlap_rs_dgrad=False,
            ub_bulk_dgrad=False, ub_bulk_wgrad=False, ub_name=None, delay_wgrad_compute=False,
            symmetric_ar_type=None, save_original_input=False, name=None,
        ):  # fmt: skip
            super().__init__()
            self._setup("Linear", in_features, out_features, sequence_parallel, tp_group, tp_size, bias,
                        params_dtype, parallel_mode, device,
                        fuse_wgrad_accumulation=fuse_wgrad_accumulation)  # fmt: skip

        def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
            return self._gemm(inp, self._prepare(inp), "Linear")

    class LayerNormLinear(_Base):
        def __init__(
            self, in_features, out_features, eps=1e-5, sequence_parallel=False, fuse_wgrad_accumulation=False,
            tp_group=None, tp_size=1, get_rng_state_tracker=None, init_method=None, bias=True,
            normalization="LayerNorm", return_bias=False, params_dtype=None, parallel_mode=None,
            return_layernorm_output=False, return_layernorm_output_gathered=False, parameters_split=None,
            zero_centered_gamma=False, device="cuda", ub_overlap_ag=False, ub_overlap_rs=False,
            ub_overlap_rs_dgrad=False, ub_bulk_wgrad=False, ub_bulk_dgrad=False, ub_name=None,
            delay_wgrad_compute=False, symmetric_ar_type=None, name=None,
        ):  # fmt: skip
            super().__init__()
            if normalization not in ("LayerNorm", "RMSNorm"):
                raise AssertionError("Unsupported normalization type!")
            if parallel_mode == "row":
                raise NotImplementedError("Normalization does not support tensor-parallel distribution.")
            self._setup("LayerNormLinear", in_features, out_features, sequence_parallel, tp_group, tp_size,
                        bias, params_dtype, parallel_mode, device, normalization=normalization, eps=eps,
                        zero_centered_gamma=zero_centered_gamma,
                        fuse_wgrad_accumulation=fuse_wgrad_accumulation)  # fmt: skip
            self.eps, self.normalization, self.zero_centered_gamma = eps, normalization, zero_centered_gamma
            self.return_layernorm_output = return_layernorm_output
            dtype = params_dtype or torch.get_default_dtype()
            gamma = torch.zeros if zero_centered_gamma else torch.ones
            self.layer_norm_weight = nn.Parameter(gamma(in_features, dtype=dtype, device=device))
            if normalization == "LayerNorm":
                self.layer_norm_bias = nn.Parameter(torch.zeros(in_features, dtype=dtype, device=device))
            else:
                self.layer_norm_bias = None

        def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
            dtype = self._prepare(inp)
            weight = self.layer_norm_weight.to(dtype) + (1 if self.zero_centered_gamma else 0)
            shape = (inp.shape[-1],)
            if self.normalization == "RMSNorm":
                ln_out = F.rms_norm(inp, shape, weight, self.eps)
            else:
                ln_out = F.layer_norm(inp, shape, weight, self.layer_norm_bias.to(dtype), self.eps)
            out = self._gemm(ln_out, dtype, "LayerNormLinear")
            return (out, ln_out) if self.return_layernorm_output else out

    return Linear, LayerNormLinear


def _assert_dim_for_fp8_exec(*tensors: torch.Tensor) -> None:
    """TE's check before an FP8 GEMM (transformer_engine/pytorch/utils.py)."""
    for tensor in tensors:
        if math.prod(tensor.shape[:-1]) % 8 != 0 or tensor.shape[-1] % 16 != 0:
            raise ValueError(
                "FP8 execution requires the product of all dimensions except the last to be divisible by "
                "8 and the last dimension to be divisible by 16, but got tensor with dims="
                f"{list(tensor.size())}"
            )
