"""Perplexity of a checkpoint on held-out data, one number per source and split.

Every token of a split is scored exactly once: the split's documents are read in file order as one
stream (as the GPT dataset concatenates them) and cut into consecutive windows of `seq_length`
predictions. The result is exp(total loss / scored tokens), a token-weighted mean, so it does not
depend on the batch size (unlike a mean of per-batch means). A prefix with a loss-mask sibling
(tools/preprocess_chat.py) is scored on its trained tokens only: the assistant's replies.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megatron_andromeda.data.indexed_dataset import IndexedDataset, dataset_exists
from megatron_andromeda.data.sft_dataset import SFTDataset, sft_prefixes
from megatron_andromeda.evaluation.scoring import EvalModel

_SPLIT = re.compile(r"^(?P<source>.+?)(?:_(?P<split>train|valid|validation|test))?(?:_text_document)?$")


@dataclass
class PerplexityResult:
    name: str
    source: str
    split: str
    tokens: int
    loss: float  # mean cross-entropy per scored token, in nats

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl": self.ppl}


class StreamWindows:
    """A dataset's tokens as consecutive windows: sample i predicts tokens [i*T + 1, (i+1)*T + 1)
    of the stream from the tokens before them; the last window is padded with loss mask 0."""

    def __init__(self, prefix: str, seq_length: int, max_tokens: int | None = None) -> None:
        self.tokens = IndexedDataset(prefix).tokens
        if max_tokens is not None:
            self.tokens = self.tokens[:max_tokens]
        self.seq_length = seq_length
        self.num_predictions = max(len(self.tokens) - 1, 0)

    def __len__(self) -> int:
        return -(-self.num_predictions // self.seq_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        T = self.seq_length
        window = np.asarray(self.tokens[i * T : (i + 1) * T + 1], dtype=np.int64)
        n = len(window) - 1
        tokens, labels, mask = np.zeros(T, np.int64), np.zeros(T, np.int64), np.zeros(T, np.float32)
        tokens[:n], labels[:n], mask[:n] = window[:-1], window[1:], 1.0
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask),
            "position_ids": torch.arange(T),
        }


@torch.no_grad()
def dataset_loss(em: EvalModel, dataset: Any, max_samples: int | None = None) -> tuple[float, int]:
    """(summed cross-entropy, number of scored tokens) over a dataset of batch dicts
    (`tokens`, `labels`, `loss_mask`, optional `position_ids` / `segment_ids`)."""
    total, count = 0.0, 0
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    for start in range(0, n, em.batch_size):
        samples = [dataset[i] for i in range(start, min(start + em.batch_size, n))]
        batch = {k: torch.stack([s[k] for s in samples]).to(em.device) for k in samples[0]}
        if int(batch["labels"].max()) >= em.real_vocab_size:
            raise ValueError(
                f"token id {int(batch['labels'].max())} is not one of the tokenizer's {em.real_vocab_size} "
                "ids; was the dataset made with another tokenizer?"
            )
        logits = em.logits(
            batch["tokens"], position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids")
        )
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        mask = batch["loss_mask"].flatten().float()
        total += float((ce * mask).sum())
        count += int(mask.sum())
    return total, count


def source_and_split(prefix: str) -> tuple[str, str]:
    """('austen', 'valid') from '.../austen_valid_text_document'; split 'all' when none is named."""
    match = _SPLIT.match(os.path.basename(os.fspath(prefix)))
    source, split = (match["source"], match["split"]) if match else (os.path.basename(prefix), None)
    return source, {"validation": "valid", None: "all"}.get(split, split)


def prefix_perplexity(
    em: EvalModel, prefix: str, seq_length: int | None = None, max_tokens: int | None = None, name: str = ""
) -> PerplexityResult:
    """Perplexity on one dataset prefix (a plain token dataset or a chat dataset with a loss mask)."""
    seq_length = min(seq_length or em.max_length, em.max_length)
    text_prefix, mask_prefix = sft_prefixes(prefix)
    if dataset_exists(text_prefix) and dataset_exists(mask_prefix):
        dataset = SFTDataset(text_prefix, seq_length, pad_id=em.tokenizer.eod_id, shuffle=False)
        max_samples = None if max_tokens is None else -(-max_tokens // seq_length)
    else:
        dataset, max_samples = StreamWindows(prefix, seq_length, max_tokens), None
    try:
        total, count = dataset_loss(em, dataset, max_samples)
    except ValueError as e:
        raise ValueError(f"{prefix}: {e}") from e
    if count == 0:
        raise ValueError(f"{prefix}: no tokens to score (the dataset is empty)")
    source, split = source_and_split(prefix)
    return PerplexityResult(name or os.path.basename(prefix), source, split, count, total / count)
