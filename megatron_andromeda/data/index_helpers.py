"""Typed entry points to the C++ index builders (`megatron_andromeda.data._helpers`).

The extension is compiled at install time (`pip install -e .`), never at run time. These wrappers
check and convert inputs, pick the index width, and turn float blend weights into the exact integer
ratios the C++ side works with. `index_reference.py` holds the NumPy definitions of each function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

try:
    from megatron_andromeda.data import _helpers
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "the C++ extension megatron_andromeda.data._helpers is missing or stale; rebuild it with "
        "`pip install --no-build-isolation -e .` from the repository root"
    ) from e

INT32_MAX = np.iinfo(np.int32).max
# Blend weights become numerators over this denominator: 2^62 keeps the rounding error below
# 1e-9 samples over any blend shorter than 2^32 slots, and the C++ sums stay inside int64.
WEIGHT_DENOMINATOR = 1 << 62


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Start (position in `doc_idx`, token offset) of each sample; shape [num_samples + 1, 2].

    Sample i spans rows i and i+1: seq_length + 1 tokens, consecutive samples sharing one token.
    Rows are int32 unless the token stream is longer than 2^31 - 1, then int64.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int32)
    if seq_length <= 0 or num_samples < 0:
        raise ValueError(f"seq_length ({seq_length}) must be positive and num_samples ({num_samples}) >= 0")
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= sizes.size):
        raise IndexError(f"doc_idx refers to documents outside [0, {sizes.size})")
    num_tokens = int(sizes.astype(np.int64)[doc_idx].sum()) if doc_idx.size else 0
    needed = num_samples * seq_length + 1
    if num_samples and num_tokens < needed:
        raise ValueError(
            f"{num_samples} samples of {seq_length} tokens need {needed} tokens; doc_idx holds {num_tokens}"
        )
    use_int64 = max(num_tokens, doc_idx.size) > INT32_MAX
    return _helpers.build_sample_idx(sizes, doc_idx, seq_length, num_samples, use_int64)


def weights_to_numerators(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Normalised weights as int64 numerators summing exactly to `WEIGHT_DENOMINATOR`."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"blend weights must be a non-empty 1-D list, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be finite, non-negative and not all zero, got {w.tolist()}")
    numerators = np.floor(w / w.sum() * float(WEIGHT_DENOMINATOR)).astype(np.int64)
    # Rounding leaves a tiny surplus or deficit; the largest source absorbs it (exact Python ints).
    numerators[int(np.argmax(w))] += WEIGHT_DENOMINATOR - int(numerators.sum(dtype=object))
    return numerators


def build_blending_indices(weights: Sequence[float] | np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave sources by weight: (dataset_index, dataset_sample_index), each of length `size`.

    dataset_index is uint8 for up to 256 sources, int16 beyond; dataset_sample_index counts, per
    source, how many of its samples came before (0, 1, 2, ...). On every prefix of s slots, source i
    has been chosen within one sample of weight_i * s times (earliest-deadline-first; see
    `index_reference.build_blending_indices`).
    """
    if size < 0:
        raise ValueError(f"blend size must be >= 0, got {size}")
    return _helpers.build_blending_indices(weights_to_numerators(weights), WEIGHT_DENOMINATOR, int(size))


def build_exhaustive_blending_indices(counts: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend that takes exactly counts[i] samples of source i (a token-budget blend), sum(counts) long.

    The weights counts[i] / sum(counts) are exact integers here, so every source ends precisely at
    its count while every prefix stays within one sample of its share.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0) or counts.sum() == 0:
        raise ValueError(f"sample counts must be a non-empty list of non-negative ints, not all 0: {counts}")
    total = int(counts.sum())
    if total > WEIGHT_DENOMINATOR:
        raise ValueError(f"blend of {total} samples is too large")
    return _helpers.build_blending_indices(np.ascontiguousarray(counts), total, total)
