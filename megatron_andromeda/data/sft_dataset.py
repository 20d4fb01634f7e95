"""Tokenized conversations on disk, and fixed-length packed samples of them for training.

On disk a conversation set is two Megatron indexed datasets with the same document boundaries:

    PREFIX_text_document.{bin,idx}      token ids, one document per conversation
    PREFIX_lossmask_document.{bin,idx}  uint8 loss mask of the same length (1 = trained)

so the token file is an ordinary dataset every tool can read, and the mask travels beside it.

`SFTDataset` packs whole conversations into samples of `seq_length` positions (next-fit over a
seeded shuffle). A conversation of n tokens fills n - 1 positions (inputs ids[:-1], labels
ids[1:]), so no label crosses into the next conversation; `segment_ids` keep attention inside each
conversation and `position_ids` restart at 0 for each. The tail of a sample is padding with loss
mask 0 and a segment of its own. A conversation longer than the sample is truncated (counted in
`num_truncated`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter

TEXT_SUFFIX = "_text_document"
MASK_SUFFIX = "_lossmask_document"


def sft_prefixes(prefix: str | os.PathLike) -> tuple[str, str]:
    """(token prefix, loss-mask prefix) for `PREFIX` or `PREFIX_text_document`."""
    base = os.fspath(prefix)
    base = base[: -len(TEXT_SUFFIX)] if base.endswith(TEXT_SUFFIX) else base
    return base + TEXT_SUFFIX, base + MASK_SUFFIX


class SFTDatasetWriter:
    """Writes ids and masks side by side; both files appear only when `finalize()` succeeds."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int) -> None:
        text_prefix, mask_prefix = sft_prefixes(prefix)
        self.text = IndexedDatasetWriter(text_prefix, IndexedDatasetWriter.best_dtype(vocab_size))
        self.mask = IndexedDatasetWriter(mask_prefix, np.uint8)
        self.num_conversations = 0
        self.num_tokens = 0
        self.num_trained = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if len(ids) != len(mask):
            raise ValueError(f"{len(ids)} token ids but {len(mask)} mask entries")
        self.text.add_document(ids)
        self.mask.add_document(mask)
        self.num_conversations += 1
        self.num_tokens += len(ids)
        self.num_trained += int(np.count_nonzero(mask))

    def finalize(self) -> None:
        self.text.finalize()
        self.mask.finalize()

    def abort(self) -> None:
        self.text.abort()
        self.mask.abort()

    def __enter__(self) -> SFTDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.finalize()


class ConversationStore:
    """Reads the token and mask datasets of one prefix and checks that they line up."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.text_prefix, self.mask_prefix = sft_prefixes(prefix)
        self.text = IndexedDataset(self.text_prefix)
        self.mask = IndexedDataset(self.mask_prefix)
        same = np.array_equal(self.text.sizes, self.mask.sizes) and np.array_equal(
            self.text.document_indices, self.mask.document_indices
        )
        if not same:
            raise DatasetError(
                f"{self.mask_prefix}.idx does not describe the same documents as {self.text_prefix}.idx "
                f"({len(self.mask)} vs {len(self.text)} sequences); rebuild both with "
                "tools/preprocess_chat.py"
            )
        self.lengths: np.ndarray = self.text.sizes.astype(np.int64)

    def __len__(self) -> int:
        return len(self.text)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.text.get(i), self.mask.get(i)


def pack_next_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Bin boundaries for items of `sizes` (each <= capacity) taken in order: bin b holds items
    [bounds[b], bounds[b + 1]). An item that does not fit in the current bin starts the next one."""
    bounds, used = [0], 0
    for i, size in enumerate(sizes.tolist()):
        if used + size > capacity:
            bounds.append(i)
            used = 0
        used += size
    if len(sizes):
        bounds.append(len(sizes))
    return np.asarray(bounds, dtype=np.int64)


class SFTDataset:
    """Packed, loss-masked conversation samples with the same keys as the GPT dataset.

    Each item is a dict of (seq_length,) tensors: `tokens`, `labels`, `loss_mask` (float),
    `position_ids` and `segment_ids`. With `num_samples`, as many shuffled epochs are packed as
    that needs; otherwise one.
    """

    def __init__(
        self,
        prefix: str | os.PathLike,
        seq_length: int,
        pad_id: int,
        seed: int = 1234,
        num_samples: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be positive")
        self.store = ConversationStore(prefix)
        self.seq_length = seq_length
        self.pad_id = pad_id
        positions = np.minimum(self.store.lengths - 1, seq_length)  # positions each one fills
        usable = np.flatnonzero(positions > 0)
        if usable.size == 0:
            raise DatasetError(f"{self.store.text_prefix}: no conversation has two or more tokens")
        self.num_truncated = int(np.count_nonzero(self.store.lengths - 1 > seq_length))
        rng = np.random.default_rng(seed)
        orders, bounds, total = [], [np.zeros(1, np.int64)], 0
        while True:
            order = rng.permutation(usable) if shuffle else usable
            epoch_bounds = pack_next_fit(positions[order], seq_length)
            orders.append(order)
            bounds.append(epoch_bounds[1:] + total)
            total += len(order)
            if num_samples is None or sum(len(b) for b in bounds) - 1 >= num_samples:
                break
        self._order = np.concatenate(orders)
        self._bounds = np.concatenate(bounds)
        if num_samples is not None:
            self._bounds = self._bounds[: num_samples + 1]
        self._positions = positions

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def conversations_of(self, i: int) -> np.ndarray:
        """Indices of the conversations packed into sample i, in order."""
        return self._order[self._bounds[i] : self._bounds[i + 1]]

    @property
    def packing_efficiency(self) -> float:
        """Share of sample positions that hold conversation tokens rather than padding."""
        filled = self._positions[self._order[: self._bounds[-1]]].sum()
        return float(filled) / (len(self) * self.seq_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        T = self.seq_length
        tokens = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(T, dtype=np.float32)
        position_ids = np.zeros(T, dtype=np.int64)
        segment_ids = np.zeros(T, dtype=np.int64)
        cursor, segment = 0, 0
        for segment, conv in enumerate(self.conversations_of(i)):
            ids, mask = self.store.get(int(conv))
            n = int(self._positions[conv])
            span = slice(cursor, cursor + n)
            tokens[span], labels[span], loss_mask[span] = ids[:n], ids[1 : n + 1], mask[1 : n + 1]
            position_ids[span] = np.arange(n)
            segment_ids[span] = segment
            cursor += n
        position_ids[cursor:] = np.arange(T - cursor)
        segment_ids[cursor:] = segment + 1  # padding attends only to itself
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment_ids),
        }
