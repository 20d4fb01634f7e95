"""NumPy/Python reference implementations of the C++ index builders in `csrc/helpers.cpp`.

They define what the fast versions must return: property tests hold the two equal on random inputs.
Use them to read the semantics, not in training (the blending reference is a Python loop).
"""

from __future__ import annotations

import heapq

import numpy as np

# Mirrors kNever in helpers.cpp: release and deadline slots are capped here (past any real blend).
NEVER = 1 << 47


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Start of every sample as (position in doc_idx, token offset in that document); [num_samples+1, 2].

    The documents `doc_idx` lists, concatenated, form one token stream; sample i covers stream tokens
    [i * seq_length, (i + 1) * seq_length] inclusive, so consecutive samples share one token (the
    last input of one sample is the first of the next; the extra token is the last label). Empty
    documents are skipped, except that sample 0 always starts at (0, 0).
    """
    if seq_length <= 0:
        raise ValueError("seq_length must be positive")
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx)]
    ends = np.cumsum(lengths)  # stream position one past each document
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and (ends.size == 0 or ends[-1] < starts[-1] + 1):
        raise IndexError("build_sample_idx: not enough tokens in doc_idx for num_samples")
    position = np.searchsorted(ends, starts, side="right")  # the document holding each start token
    offset = starts - (
        ends[np.minimum(position, ends.size - 1)] - lengths[np.minimum(position, ends.size - 1)]
    )
    out = np.stack([position, offset], axis=1)
    out[0] = 0
    return out


def build_blending_indices(
    numerators: np.ndarray, denominator: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Earliest-deadline-first blend of sources with weights numerators / denominator.

    Source i's k-th sample (k >= 1) may fill slot t only within its window
    [floor((k-1) D / n_i), ceil(k D / n_i)); each slot goes to the released source whose window
    closes first (ties: the lowest source). Returns (dataset_index, dataset_sample_index).
    """
    numerators = [int(n) for n in numerators]
    if sum(numerators) != denominator:
        raise ValueError("numerators must sum to the denominator")

    def release(i: int, count: int) -> int:
        return min(count * denominator // numerators[i], NEVER)

    def deadline(i: int, count: int) -> int:
        q, r = divmod((count + 1) * denominator, numerators[i])
        return min(q, NEVER) + (r != 0)

    counts = [0] * len(numerators)
    ready = [(deadline(i, 0), i) for i, n in enumerate(numerators) if n > 0]
    heapq.heapify(ready)
    waiting: list[tuple[int, int]] = []
    dataset_index = np.empty(size, dtype=np.uint8 if len(numerators) <= 256 else np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for t in range(size):
        while waiting and waiting[0][0] <= t:
            i = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (deadline(i, counts[i]), i))
        i = heapq.heappop(ready)[1]
        dataset_index[t], dataset_sample_index[t] = i, counts[i]
        counts[i] += 1
        if release(i, counts[i]) <= t + 1:
            heapq.heappush(ready, (deadline(i, counts[i]), i))
        else:
            heapq.heappush(waiting, (release(i, counts[i]), i))
    return dataset_index, dataset_sample_index


def gather_sample(
    tokens: np.ndarray,
    token_starts: np.ndarray,
    sizes: np.ndarray,
    doc_idx: np.ndarray,
    sample_idx: np.ndarray,
    seq_length: int,
    sample: int,
) -> np.ndarray:
    """The seq_length + 1 tokens of `sample` as int64: from its start row to its end row inclusive."""
    (first, first_offset), (last, last_offset) = sample_idx[sample], sample_idx[sample + 1]
    pieces = []
    for pos in range(first, last + 1):
        start = int(token_starts[doc_idx[pos]])
        begin = start + (first_offset if pos == first else 0)
        end = start + (last_offset + 1 if pos == last else int(sizes[doc_idx[pos]]))
        pieces.append(tokens[begin:end])
    out = np.concatenate(pieces).astype(np.int64)
    assert out.size == seq_length + 1
    return out


def document_positions(tokens: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, segment_ids): positions restart at 0 after each `eod_id`; segment k holds the
    tokens after the k-th end-of-document token, the EOD itself closing the segment before it."""
    is_eod = np.asarray(tokens) == eod_id
    n = is_eod.size
    restart = np.zeros(n, dtype=np.int64)
    after = np.flatnonzero(is_eod[:-1]) + 1
    restart[after] = after
    positions = np.arange(n, dtype=np.int64) - np.maximum.accumulate(restart)
    segments = np.zeros(n, dtype=np.int64)
    np.cumsum(is_eod[:-1], out=segments[1:])
    return positions, segments
