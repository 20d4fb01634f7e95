"""Transformer Engine modules for every block GEMM, at any tensor-parallel degree.

`swap_block_linears(block, te, fuse_norm=...)` replaces the four projections of a transformer block
(qkv, o_proj, gate_up / up, down_proj) with TE modules, after tensor parallelism has sharded them:

- the projections a norm feeds (qkv and the MLP's up projection) become `te.LayerNormLinear` when
  `fuse_norm` (the norm runs inside TE's kernel, which with FP8 writes the GEMM's FP8 input
  directly), else `te.Linear`; o_proj and down_proj become `te.Linear`;
- each TE module holds the very `nn.Parameter` the replaced layer held (the whole weight at tensor
  degree 1, this rank's shard above it), so parameter names, shapes, tensor-parallel tags, and
  with them checkpoints, resharding, HF export and the optimizer's groups are unchanged.

**The communication contract: TE does local GEMMs, our region hooks keep every collective.**
Every TE module is built with `parallel_mode=None` (no `tp_group`, no `sequence_parallel`), on the
shard our layers held. TE's own column / row modes are not used, for two reasons:

1. TE's sequence parallelism gathers and reduce-scatters along the *first* dimension (Megatron's
   sequence-first (T, B, D) activations); ours are batch-first (B, T, D), so TE would concatenate
   batch entries instead of sequence chunks (at micro-batch 1 it would hand attention tp short
   sequences instead of one long one).
2. The PaLM block feeds one norm's output to two column-parallel projections and sums two
   row-parallel partials: parallel/parallelize.py enters and leaves that region once each way per
   layer, where per-module collectives would pay two each way.

So the collectives (all-gather / reduce-scatter under sequence parallelism, all-reduce without)
and the math are exactly the ones the tensor-parallel parity tests check for our own layers. What
this gives up: TE's communication/GEMM overlap (userbuffers) and the all-gather of FP8 (rather
than BF16) inputs under sequence parallelism.

**The fused norm.** With `fuse_norm`, the block's norm module stays where it is, holding its
`weight` (so `layers.N.norm.weight` keeps its name and comes first in `named_parameters()`, which
lists a parameter shared by several modules once, under its first name), but it becomes a
pass-through (`FusedNorm`): the LayerNormLinear modules it feeds hold the same parameter as their
`layer_norm_weight` and normalise themselves. The region hook on the norm then gathers the
un-normalised input, which is equivalent: norms act per token. TE's LayerNorm always has a bias
(`layer_norm_bias`); ours has none, so that parameter is replaced by a zero buffer that is never
saved or trained. In the PaLM block both projections normalise the same input (one more
memory-bound pass per layer; with FP8 it replaces the cast the second GEMM would need anyway).
Under tensor parallelism the fused norm runs inside the region, where each rank's gradient of its
weight covers only its own output columns: the weight is tagged as a partial gradient
(`sequence_parallel`, the tag TE and Megatron use) and summed over the tensor group, as norms
under sequence parallelism already are. This module sits below parallel/ (it imports no part of it):
it reads the tensor-parallel layers through their `local_gemm` property and the parameter tags
documented in parallel/tensor_parallel.py.

**State dicts.** `module.state_dict()` of a swapped block has the plain keys: the fused modules'
`layer_norm_weight` aliases and TE's `_extra_state` (FP8 scaling metadata, a pickled byte tensor)
are dropped, and loading a plain state dict strictly works (the aliases load through the norm; an
incoming `_extra_state` is discarded unread, so nothing is unpickled). The checkpoint code reads
`named_parameters()` only: FP8 metadata is deliberately not checkpointed (checkpoint/__init__.py).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from megatron_andromeda.models.layers import ParallelBlock, SequentialBlock

EXTRA_STATE = "_extra_state"  # torch's state-dict key suffix for get_extra_state()
UP = "mlp.up"  # the MLP's up projection: gate_up_proj (SwiGLU) or up_proj (GELU)
# Which projections each norm of a block feeds (paths inside the block).
NORM_FEEDS: dict[type[nn.Module], dict[str, tuple[str, ...]]] = {
    ParallelBlock: {"norm": ("attn.qkv_proj", UP)},
    SequentialBlock: {"norm1": ("attn.qkv_proj",), "norm2": (UP,)},
}
PROJECTIONS = ("attn.qkv_proj", "attn.o_proj", UP, "mlp.down_proj")


class FusedNorm(nn.Module):
    """A norm whose math moved into the TE LayerNormLinear modules it feeds: x passes through.

    It keeps its parameters (their names and place in `named_parameters()`) and the forward hooks
    others registered on it (tensor parallelism enters its region there).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def swap_block_linears(block: nn.Module, te: ModuleType, *, fuse_norm: bool) -> list[nn.Module]:
    """Replace the block's four projections with TE modules in place; returns the new modules."""
    feeds = NORM_FEEDS.get(type(block))
    if feeds is None:
        raise TypeError(f"no Transformer Engine mapping for block type {type(block).__name__}")
    fused_by = {path: norm for norm, paths in feeds.items() for path in paths} if fuse_norm else {}
    sharded = is_tensor_parallel(block)
    new = []
    for path in PROJECTIONS:
        parent, name = _locate(block, path)
        old = getattr(parent, name)
        _check_local_gemm(old, f"{type(block).__name__}.{path}")
        norm_name = fused_by.get(path)
        if norm_name is None:
            module = _te_linear(te, old.weight)
        else:
            module = _te_norm_linear(te, old.weight, getattr(block, norm_name))
        setattr(parent, name, module)
        new.append(module)
    for norm_name in feeds if fuse_norm else ():
        norm = getattr(block, norm_name)
        norm.__class__ = FusedNorm
        if sharded:  # inside the region each rank's norm output feeds only its own columns
            for param in norm.parameters():
                param.sequence_parallel = True  # partial gradient (parallel/tensor_parallel.py's tags)
    return new


def is_tensor_parallel(block: nn.Module) -> bool:
    """Whether tensor parallelism sharded the block (its shards carry the `tensor_parallel` tag)."""
    return any(getattr(p, "tensor_parallel", False) for p in block.attn.parameters())


def _locate(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, name = path.split(".")
    parent = getattr(block, owner)
    if path == UP:
        name = "gate_up_proj" if parent.swiglu else "up_proj"
    return parent, name


def _check_local_gemm(module: nn.Module, where: str) -> None:
    """Only a plain GEMM can become a local TE GEMM: a bias-free nn.Linear, or a tensor-parallel layer
    whose region is entered and left outside it (its `local_gemm`, parallel/tensor_parallel.py)."""
    local = (type(module) is nn.Linear and module.bias is None) or getattr(module, "local_gemm", False)
    if not local:
        raise ValueError(
            f"{where} is a {type(module).__name__} ({module.extra_repr()}): Transformer Engine modules "
            "replace bias-free nn.Linear layers and tensor-parallel layers whose region is entered and "
            "left outside them (parallel/parallelize.py) only"
        )


def _common_args(weight: nn.Parameter) -> dict:
    """TE arguments shared by every module: a local GEMM on `weight`'s device and dtype, no collectives."""
    return dict(
        bias=False,
        params_dtype=weight.dtype,
        device=weight.device,
        parallel_mode=None,
        tp_group=None,
        tp_size=1,
        sequence_parallel=False,
        fuse_wgrad_accumulation=False,  # gradients reach our fp32 main-grad buffers through .grad
    )


def _own_initial_weights(device: torch.device):
    """TE's constructors draw initial weights we discard: restore the default generators afterwards,
    so that a run with TE draws the same dropout masks as one without."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _te_linear(te: ModuleType, weight: nn.Parameter) -> nn.Module:
    out_features, in_features = weight.shape
    with _own_initial_weights(weight.device):
        module = te.Linear(in_features, out_features, **_common_args(weight))
    module.weight = weight
    _hide_from_state_dict(module, aliases=())
    return module


def _te_norm_linear(te: ModuleType, weight: nn.Parameter, norm: nn.Module) -> nn.Module:
    if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) or norm.weight is None:
        raise ValueError(f"cannot fuse a {type(norm).__name__} into LayerNormLinear (a learned-weight "
                         "LayerNorm or RMSNorm only)")  # fmt: skip
    kind = "RMSNorm" if isinstance(norm, nn.RMSNorm) else "LayerNorm"
    eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps  # RMSNorm's default
    out_features, in_features = weight.shape
    with _own_initial_weights(weight.device):
        module = te.LayerNormLinear(
            in_features, out_features, eps=eps, normalization=kind, zero_centered_gamma=False,
            **_common_args(weight),
        )  # fmt: skip
    module.weight = weight
    module.layer_norm_weight = norm.weight
    aliases = ["layer_norm_weight"]
    if kind == "LayerNorm":
        del module.layer_norm_bias
        if getattr(norm, "bias", None) is not None:
            module.layer_norm_bias = norm.bias
            aliases.append("layer_norm_bias")
        else:  # TE's LayerNorm always adds a bias; ours has none: zeros, never trained or saved
            zeros = torch.zeros(in_features, dtype=norm.weight.dtype, device=norm.weight.device)
            module.register_buffer("layer_norm_bias", zeros, persistent=False)
    _hide_from_state_dict(module, aliases)
    return module


def _hide_from_state_dict(module: nn.Module, aliases: list[str] | tuple[str, ...]) -> None:
    """state_dict() without the aliases of the norm's parameters and TE's `_extra_state`; a plain
    state dict loads strictly, and an incoming `_extra_state` is dropped unread."""
    hidden = (*aliases, EXTRA_STATE)

    def drop_saved(mod, state_dict, prefix, local_metadata) -> None:
        for key in hidden:
            state_dict.pop(prefix + key, None)

    loading_as: list[str] = []  # the module's prefix in the load under way (the pre-hook sees it)

    def drop_incoming(mod, state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + EXTRA_STATE, None)  # TE would unpickle it
        loading_as.append(prefix)

    def forgive_missing(mod, incompatible) -> None:
        # the aliases were loaded through the norm that owns them; `incompatible` lists the whole
        # load's keys, so only this module's are removed
        mine = {prefix + key for prefix in loading_as for key in hidden}
        loading_as.clear()
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in mine]

    module.register_state_dict_post_hook(drop_saved)
    module.register_load_state_dict_pre_hook(drop_incoming)
    module.register_load_state_dict_post_hook(forgive_missing)
