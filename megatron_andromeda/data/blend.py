"""One blend type, from a stage recipe (or a Megatron blend list) to the C++ index helper.

A blend is what one split of a run reads: named sources, each a dataset prefix with its share of
the samples. It is parsed and normalised once, here, and handed down as it is: names come from the
recipe (or, for a plain list, from the prefixes) and travel with the weights to the
`BlendedDataset`, the per-source losses and the data report; nothing re-parses strings.

    blends = resolve_blends(cfg.data)          # {"train": Blend, "valid": Blend, "test": Blend}
    blends["train"].weights                    # normalised, float64, sums to 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_andromeda.config import DataConfig
from megatron_andromeda.errors import ConfigError

SPLITS = ("train", "valid", "test")


def normalise(raw: Sequence[float], where: str) -> list[float]:
    """Shares summing to 1 from non-negative raw weights (or token budgets); the one normaliser."""
    values = [float(w) for w in raw]
    if any(not (w >= 0 and np.isfinite(w)) for w in values):
        raise ConfigError(f"{where}: weights must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise ConfigError(f"{where}: the weights sum to zero")
    return [w / total for w in values]


@dataclass(frozen=True)
class BlendSource:
    name: str  # a label for logs and reports
    prefix: str  # the dataset (prefix of its .bin/.idx)
    weight: float  # share of the split's samples; a blend's weights sum to 1


@dataclass(frozen=True)
class Blend:
    sources: tuple[BlendSource, ...]
    field: str = ""  # where it came from, for messages ("data.train", "recipe r.yaml: valid")

    @classmethod
    def of(cls, entries: Sequence[tuple[str, str, float]], field: str) -> Blend:
        """From (name, prefix, raw weight) entries; weights are normalised here, once."""
        if not entries:
            return cls((), field)
        shares = normalise([w for _, _, w in entries], field)
        return cls(tuple(BlendSource(n, p, s) for (n, p, _), s in zip(entries, shares)), field)

    @classmethod
    def parse(cls, entries: Sequence[str], field: str) -> Blend:
        """A Megatron blend list: [prefix, ...] (equal weights) or [weight, prefix, weight, prefix, ...]."""
        if not entries:
            return cls((), field)
        try:
            float(entries[0])
        except ValueError:
            pairs = [(1.0, prefix) for prefix in entries]
        else:
            pairs = _weighted_pairs(entries, field)
        prefixes = [prefix for _, prefix in pairs]
        return cls.of([(n, p, w) for n, (w, p) in zip(source_labels(prefixes), pairs)], field)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def weights(self) -> np.ndarray:
        return np.array([s.weight for s in self.sources], dtype=np.float64)

    @property
    def prefixes(self) -> list[str]:
        return [s.prefix for s in self.sources]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


def _weighted_pairs(entries: Sequence[str], field: str) -> list[tuple[float, str]]:
    if len(entries) % 2:
        raise ConfigError(f"{field}: a weighted blend alternates weight, prefix; got {len(entries)} entries")
    pairs = []
    for weight, prefix in zip(entries[::2], entries[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ConfigError(f"{field}: {weight!r} should be a weight before prefix {prefix!r}") from None
    return pairs


def source_labels(prefixes: Sequence[str]) -> list[str]:
    """Short unique names for logging: 'en' for data/c4/en_text_document, 'c4/en' if 'en' repeats."""
    if not prefixes:
        return []
    parts = [Path(p.removesuffix("_text_document")).parts for p in prefixes]
    labels: list[str] = []
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{k}:{label}" for k, label in enumerate(labels)]  # the same prefix listed twice


def resolve_blends(data_cfg: DataConfig) -> dict[str, Blend]:
    """The train / valid / test blends of a data config: from its recipe, else from its lists.

    An explicit `data.valid` / `data.test` list wins over the recipe's splits.
    """
    from megatron_andromeda.data.recipe import load_recipe  # recipe.py builds blends: a cycle at import

    lists = {split: Blend.parse(getattr(data_cfg, split), f"data.{split}") for split in SPLITS}
    if not data_cfg.recipe:
        return lists
    recipe = load_recipe(data_cfg.recipe)
    return {split: lists[split] if lists[split] else recipe.blend(split) for split in SPLITS}
