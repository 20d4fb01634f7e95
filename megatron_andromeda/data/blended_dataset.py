"""A weighted interleaving of several datasets, deterministic in the sample index.

Slot i of the blend is sample `dataset_sample_index[i]` of dataset `dataset_index[i]`, both from the
C++ blending helper: on every prefix of the blend each source's share is within one sample of its
weight. Because item i depends only on i, resuming after `consumed` samples is just reading from
index `consumed` on; nothing else needs saving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_andromeda.data.index_helpers import build_blending_indices, build_exhaustive_blending_indices


def _shares(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The weights as float64, checked to be shares (data.blend.Blend normalises them, once)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isclose(w.sum(), 1.0, rtol=0, atol=1e-9):
        raise ValueError(
            f"blend weights must be shares summing to 1 (see data.blend.Blend), got {w.tolist()}"
        )
    return w


def samples_needed(weights: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    """How many samples each source must provide for a blend of `size` (an upper bound by <= 1).

    The blend never takes more than weight * size + 1 samples from a source, so floor(w * size) + 1
    always suffices; building the sources this size avoids building the blend twice.
    """
    w = _shares(weights)
    return np.where(w > 0, np.floor(w * size + 1e-6).astype(np.int64) + 1, 0)


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights` (shares summing to 1).

    `names` label the sources in per-source losses and reports (default: source0, source1, ...).
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int,
        names: Sequence[str] | None = None,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        shares = _shares(weights)
        self._setup(datasets, shares, *build_blending_indices(shares, size), names=names)

    @classmethod
    def from_sample_counts(
        cls, datasets: Sequence[torch.utils.data.Dataset], counts: Sequence[int]
    ) -> BlendedDataset:
        """A blend of exactly counts[i] samples of dataset i, interleaved evenly (sum(counts) long)."""
        if len(datasets) != len(counts):
            raise ValueError(f"{len(datasets)} datasets but {len(counts)} sample counts")
        counts = np.asarray(counts, dtype=np.int64)
        blend = cls.__new__(cls)
        dataset_index, sample_index = build_exhaustive_blending_indices(counts)
        blend._setup(datasets, counts / counts.sum(), dataset_index, sample_index)
        return blend

    @classmethod
    def from_token_budgets(
        cls, datasets: Sequence[torch.utils.data.Dataset], token_budgets: Sequence[int], seq_length: int
    ) -> BlendedDataset:
        """A blend spending token_budgets[i] tokens (rounded down to whole samples) on dataset i."""
        counts = np.asarray(token_budgets, dtype=np.int64) // seq_length
        if np.any(counts < 0) or counts.sum() == 0:
            raise ValueError(f"token budgets {list(token_budgets)} give no whole {seq_length}-token samples")
        return cls.from_sample_counts(datasets, counts)

    def _setup(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: np.ndarray,
        dataset_index: np.ndarray,
        dataset_sample_index: np.ndarray,
        names: Sequence[str] | None = None,
    ) -> None:
        self.datasets = list(datasets)
        self.source_names = list(names) if names is not None else [f"source{k}" for k in range(len(datasets))]
        if len(self.source_names) != len(self.datasets):
            raise ValueError(f"{len(self.datasets)} datasets but {len(self.source_names)} names")
        self.weights = weights
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        used = np.bincount(dataset_index, minlength=len(self.datasets))
        for k, dataset in enumerate(self.datasets):
            if len(dataset) < used[k]:
                raise ValueError(
                    f"blend source {k} has {len(dataset)} samples but the blend takes {used[k]}; "
                    "build it with at least blended_dataset.samples_needed(weights, size) samples"
                )

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]

    def source_counts(self, consumed: int) -> np.ndarray:
        """Samples taken from each source among the first `consumed` (for logging data mixes)."""
        return np.bincount(self.dataset_index[:consumed], minlength=len(self.datasets))
