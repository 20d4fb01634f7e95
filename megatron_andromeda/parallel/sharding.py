"""Split full weights into tensor-parallel shards and merge shards back, by parameter name.

Pure tensor functions with no process group: parallelize.py uses them to shard a freshly built
model, checkpoint resharding and the Hugging Face converter use them to move between layouts, and
the tests use them to compare sharded gradients with single-process ones.

| parameter (suffix)                        | rank r of tp holds                                        |
|-------------------------------------------|-----------------------------------------------------------|
| attn.qkv_proj.weight                      | its q heads, then its k heads, then its v heads (below)   |
| mlp.gate_up_proj.weight                   | [gate rows chunk r; up rows chunk r]                      |
| mlp.up_proj.weight                        | rows chunk r (column-parallel)                            |
| attn.o_proj.weight, mlp.down_proj.weight  | columns chunk r (row-parallel)                            |
| embedding.weight, lm_head.weight          | vocabulary rows chunk r                                   |
| norm / norm1 / norm2 / final_norm .weight | everything (replicated)                                   |

Query heads are split evenly. KV heads are split when num_kv_heads >= tp; otherwise each KV head is
replicated on the tp / num_kv_heads consecutive ranks whose query heads use it (multi-query: every
rank holds the one KV head).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from megatron_andromeda.models.attention import QKVLayout
from megatron_andromeda.models.config import ModelConfig

_RULES: tuple[tuple[str, str], ...] = (
    (r"attn\.qkv_proj\.weight$", "qkv"),
    (r"mlp\.gate_up_proj\.weight$", "gate_up"),
    (r"mlp\.up_proj\.weight$", "rows"),
    (r"(attn\.o_proj|mlp\.down_proj)\.weight$", "columns"),
    (r"(^|\.)(embedding|lm_head)\.weight$", "rows"),
    (r"(^|\.)(norm\d?|final_norm)\.weight$", "replicated"),
)


def split_kind(name: str) -> str:
    """How `name` is split: qkv, gate_up, rows, columns or replicated."""
    for pattern, kind in _RULES:
        if re.search(pattern, name):
            return kind
    raise ValueError(f"no tensor-parallel split rule for parameter {name!r}; add one to parallel/sharding.py")


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    return max(cfg.num_kv_heads // tp, 1)


def kv_replicas(cfg: ModelConfig, tp: int) -> int:
    """How many tensor ranks hold each KV head (1 when the KV heads are split)."""
    return max(tp // cfg.num_kv_heads, 1)


def shard_qkv_layout(cfg: ModelConfig, tp: int) -> QKVLayout:
    """The fused qkv layout of one rank's shard: its query heads, then the KV heads they use."""
    return QKVLayout(cfg.num_heads // tp, kv_heads_per_rank(cfg, tp), cfg.kv_channels)


def qkv_rows(cfg: ModelConfig, rank: int, tp: int) -> tuple[slice, slice, slice]:
    """The q, k and v row ranges of the full fused qkv weight that rank `rank` holds."""
    full, shard = QKVLayout.of(cfg), shard_qkv_layout(cfg, tp)
    chunk = rank // kv_replicas(cfg, tp)  # which KV chunk this rank's query heads use
    k_start = full.q_rows + chunk * shard.kv_rows
    v_start = k_start + full.kv_rows
    return (
        slice(rank * shard.q_rows, (rank + 1) * shard.q_rows),
        slice(k_start, k_start + shard.kv_rows),
        slice(v_start, v_start + shard.kv_rows),
    )


def _chunk(full: torch.Tensor, rank: int, tp: int, dim: int, name: str) -> torch.Tensor:
    if full.shape[dim] % tp:
        raise ValueError(
            f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by tensor degree {tp}"
        )
    return full.chunk(tp, dim=dim)[rank]


def shard_param(name: str, full: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of the full tensor `full` of parameter `name` (a new, contiguous tensor)."""
    kind = split_kind(name)
    if tp == 1 or kind == "replicated":
        return full.clone()
    if kind == "qkv":
        return torch.cat([full[rows] for rows in qkv_rows(cfg, rank, tp)])
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat((_chunk(gate, rank, tp, 0, name), _chunk(up, rank, tp, 0, name)))
    return _chunk(full, rank, tp, 0 if kind == "rows" else 1, name).clone()


def shard_shape(name: str, full_shape: Sequence[int], cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """Shape of every rank's shard (shapes do not depend on the rank)."""
    return tuple(shard_param(name, torch.empty(tuple(full_shape), device="meta"), cfg, 0, tp).shape)


def _same_replicas(name: str, copies: Sequence[torch.Tensor], ranks: Sequence[int]) -> torch.Tensor:
    for rank, copy in zip(ranks[1:], copies[1:]):
        if not torch.equal(copy, copies[0]):
            raise ValueError(
                f"{name}: tensor ranks {ranks[0]} and {rank} hold different copies of replicated values "
                "(were the tensor-parallel gradients finalised before the optimizer step?)"
            )
    return copies[0]


def _merge_qkv(name: str, shards: Sequence[torch.Tensor], cfg: ModelConfig, check: bool) -> torch.Tensor:
    tp = len(shards)
    layout = shard_qkv_layout(cfg, tp)
    reps = kv_replicas(cfg, tp)
    parts = [layout.split(s) for s in shards]  # (q, k, v) of every rank
    q, k, v = [p[0] for p in parts], [], []
    for first in range(0, tp, reps):
        ranks = list(range(first, first + reps))
        if check:
            _same_replicas(name, [shards[r][layout.q_rows :] for r in ranks], ranks)
        k.append(parts[first][1])
        v.append(parts[first][2])
    return torch.cat(q + k + v)


def merge_param(
    name: str, shards: Sequence[torch.Tensor], cfg: ModelConfig, check_replicas: bool = True
) -> torch.Tensor:
    """The full tensor of parameter `name` from the shards of tensor ranks 0..tp-1 (inverse of shard_param).

    With check_replicas, replicated values (norm weights, replicated KV rows) must agree exactly.
    """
    tp = len(shards)
    kind = split_kind(name)
    if kind == "replicated" or tp == 1:
        return (_same_replicas(name, shards, range(tp)) if check_replicas else shards[0]).clone()
    if kind == "qkv":
        return _merge_qkv(name, shards, cfg, check_replicas)
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(shards), dim=0 if kind == "rows" else 1)


def shard_state_dict(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, rank: int, tp: int
) -> dict[str, torch.Tensor]:
    return {name: shard_param(name, tensor, cfg, rank, tp) for name, tensor in state.items()}


def merge_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]], cfg: ModelConfig, check_replicas: bool = True
) -> dict[str, torch.Tensor]:
    """One full state dict from the tensor ranks' state dicts (same keys on every rank)."""
    return {name: merge_param(name, [s[name] for s in states], cfg, check_replicas) for name in states[0]}
