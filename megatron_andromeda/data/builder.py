"""Train/valid/test datasets from the blends of a `DataConfig` (blend.py: a recipe or blend lists).

Every prefix is checked before any index is built: the files exist, their structure is sound,
and the largest token id fits `model.vocab_size`.
`check_training_data` runs the tokenizer checks of checks.py on every dataset of every stage,
before any process group exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_andromeda.config import ConfigError, DataConfig, RunConfig
from megatron_andromeda.data.blend import SPLITS, Blend, resolve_blends
from megatron_andromeda.data.blended_dataset import BlendedDataset, samples_needed
from megatron_andromeda.data.checks import DataUse, check_datasets, default_cache_dir, token_range
from megatron_andromeda.data.gpt_dataset import GPTDataset
from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset, dataset_exists
from megatron_andromeda.data.sft_dataset import SFTDataset, sft_prefixes
from megatron_andromeda.data.tokenizer import Tokenizer, load_tokenizer


def is_chat_dataset(prefix: str) -> bool:
    """Chat data (tools/preprocess_chat.py) carries a loss-mask sibling: packed, masked SFT samples."""
    return dataset_exists(sft_prefixes(prefix)[1])


def open_checked(prefix: str, vocab_size: int, field: str, cache_dir: str = "") -> IndexedDataset:
    """Open a dataset after checking it exists and that its token ids fit the model's vocabulary
    (the largest id from the sidecar or the token-range cache when they know it, else a scan)."""
    if not dataset_exists(prefix):
        raise DatasetError(
            f"{field}: dataset {prefix!r} not found ({prefix}.bin and {prefix}.idx); "
            "create it with tools/preprocess_data.py"
        )
    dataset = IndexedDataset(prefix)
    found = token_range(dataset, cache_dir or None)
    if found is not None and found.min_id < 0:
        raise DatasetError(f"{prefix}.bin: negative token ids; the dataset is corrupt")
    if found is not None and found.max_id >= vocab_size:
        raise DatasetError(
            f"{prefix}.bin: largest token id {found.max_id} does not fit model.vocab_size="
            f"{vocab_size}; raise model.vocab_size above it or re-tokenize with the model's tokenizer"
        )
    return dataset


def check_training_data(
    configs: Sequence[RunConfig],
    stage_labels: Sequence[str] = (),
    blends: Sequence[dict[str, Blend]] | None = None,
) -> None:
    """Check every dataset that a run (or each of its stages, one config each) will read against
    the run's tokenizer: same tokenizer as the sidecar records (unless
    data.allow_tokenizer_mismatch), token ids below its vocabulary, and no empty dataset that must
    give samples; each error names the dataset (and its sidecar).

    Called once per process before any process group exists. Only global rank 0 scans token ids
    that neither a sidecar nor the cache records (then caches them): under torchrun the other ranks
    are stopped when it fails, and they find its cache when they open the data.
    """
    scan = int(os.environ.get("RANK", "0")) == 0
    tokenizers: dict[str, Tokenizer] = {}
    for i, cfg in enumerate(configs):
        where = f"stage {stage_labels[i]}: " if i < len(stage_labels) else ""
        path = cfg.data.tokenizer
        if not path or not os.path.isfile(path):
            return  # the run's own input checks report a missing tokenizer
        if path not in tokenizers:
            tokenizers[path] = load_tokenizer(path)
        split_blends = blends[i] if blends is not None else resolve_blends(cfg.data)
        uses = [DataUse(s.prefix, f"{where}data.train", s.weight > 0) for s in split_blends["train"].sources]
        if cfg.train.eval_batches > 0:
            uses += [
                DataUse(s.prefix, f"{where}data.valid", s.weight > 0) for s in split_blends["valid"].sources
            ]
        check_datasets(
            uses, tokenizers[path], override="data.allow_tokenizer_mismatch=true",
            allow_tokenizer_mismatch=cfg.data.allow_tokenizer_mismatch,
            cache_dir=cfg.data.cache_dir or None, scan=scan,
        )  # fmt: skip


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    num_samples: tuple[int, int, int],
    seq_length: int,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    blends: dict[str, Blend] | None = None,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """(train, valid, test) datasets; a split with no sources or zero samples is None.

    `blends` are the run's resolved blends (default: `resolve_blends(data_cfg)`); `group` is the
    process group whose rank 0 builds index caches (default: the world).
    """
    blends = blends if blends is not None else resolve_blends(data_cfg)
    opened: dict[str, IndexedDataset] = {}
    out = []
    for split, n in zip(SPLITS, num_samples):
        blend = blends[split]
        if not blend or n <= 0:
            out.append(None)
            continue
        for prefix in blend.prefixes:
            if prefix not in opened:
                opened[prefix] = open_checked(prefix, vocab_size, blend.field, data_cfg.cache_dir)
        out.append(_build_split(data_cfg, tokenizer, split, blend, opened, n, seq_length, group))
    return tuple(out)


def check_chat_mix(data_cfg: DataConfig, split: str, blend: Blend) -> None:
    """Chat and plain sources in one blend need per-document positions and attention for both.

    Chat samples always carry `segment_ids` and restarted `position_ids`; plain samples carry them
    only with both reset flags, and a batch needs the same fields in every sample.
    """
    chat = [prefix for prefix in blend.prefixes if is_chat_dataset(prefix)]
    plain = [prefix for prefix in blend.prefixes if prefix not in chat]
    if chat and plain and not (data_cfg.reset_attention_mask and data_cfg.reset_position_ids):
        raise ConfigError(
            f"data.{split} mixes chat datasets ({chat[0]}) with plain ones ({plain[0]}): set "
            "data.reset_attention_mask=true and data.reset_position_ids=true (a stage's "
            "reset_attention_mask / reset_position_ids) so that every sample keeps attention and "
            "positions within its own document"
        )


def _build_split(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    blend: Blend,
    opened: dict[str, IndexedDataset],
    num_samples: int,
    seq_length: int,
    group: dist.ProcessGroup | None,
) -> torch.utils.data.Dataset:
    check_chat_mix(data_cfg, split, blend)
    per_source = [num_samples] if len(blend) == 1 else samples_needed(blend.weights, num_samples).tolist()
    sources = []
    for prefix, n in zip(blend.prefixes, per_source):
        if is_chat_dataset(prefix):
            pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eod_id
            sources.append(SFTDataset(prefix, seq_length, pad_id, seed=data_cfg.seed, num_samples=int(n)))
            continue
        indexed = opened[prefix]
        cache_dir = data_cfg.cache_dir or default_cache_dir(prefix)
        sources.append(
            GPTDataset(
                indexed,
                np.arange(len(indexed), dtype=np.int32),
                int(n),
                seq_length,
                data_cfg.seed,
                eod_id=tokenizer.eod_id,
                reset_position_ids=data_cfg.reset_position_ids,
                reset_attention_mask=data_cfg.reset_attention_mask,
                eod_mask_loss=data_cfg.eod_mask_loss,
                cache_dir=cache_dir,
                name=split,
                group=group,
            )
        )
    if len(sources) == 1:
        return sources[0]
    return BlendedDataset(sources, blend.weights, num_samples, names=blend.names)
