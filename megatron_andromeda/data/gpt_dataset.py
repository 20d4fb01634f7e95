"""Fixed-length GPT training samples cut from an indexed dataset, with cached, seeded index arrays.

Three index arrays define the dataset (see README.md in this folder):

- `doc_idx` [int32]: the split's documents in training order, one independent seeded permutation per
  epoch, for as many epochs as `num_samples` needs. Because every epoch is a full permutation, the
  documents used from the last, partial epoch are a uniform random subset: no separate last-epoch
  shuffle is needed (Megatron shuffles several epochs jointly and then must treat the last apart).
- `sample_idx` [int32|int64, (num_samples+1, 2)]: where each sample starts in that stream, from the
  C++ helper. Sample i is seq_length + 1 tokens and crosses document boundaries freely.
- `shuffle_idx` [int32|int64]: a seeded permutation of the samples, so i -> sample shuffle_idx[i].

They are built once and saved as `.npy` files whose names carry a hash of everything that affects
them. Under torch.distributed, rank 0 of `group` builds and the other ranks wait for its verdict: a
failed build raises on every rank instead of leaving the others hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_andromeda.data import _helpers
from megatron_andromeda.data.index_helpers import build_sample_idx
from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset
from megatron_andromeda.data.sidecar import find_sidecar

INDEX_VERSION = 1  # bump when the way the arrays are built changes, to orphan old caches
_ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


def build_gpt_indices(
    sizes: np.ndarray, doc_ids: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> dict[str, np.ndarray]:
    """The three index arrays of a GPTDataset (see the module docstring)."""
    doc_ids = np.asarray(doc_ids, dtype=np.int32)
    tokens_per_epoch = int(sizes[doc_ids].sum(dtype=np.int64)) if doc_ids.size else 0
    if num_samples and tokens_per_epoch == 0:
        raise ValueError("cannot cut samples from a split with no tokens")
    needed = num_samples * seq_length + 1  # +1: the last sample's final label
    num_epochs = max(1, -(-needed // tokens_per_epoch)) if num_samples else 0
    rng = np.random.Generator(np.random.PCG64(seed))
    doc_idx = np.empty(num_epochs * doc_ids.size, dtype=np.int32)
    for epoch in range(num_epochs):
        doc_idx[epoch * doc_ids.size : (epoch + 1) * doc_ids.size] = rng.permutation(doc_ids)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_samples)
    shuffle_idx = np.arange(num_samples, dtype=np.int32 if num_samples < 2**31 else np.int64)
    rng.shuffle(shuffle_idx)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def load_or_build_cached(
    cache_dir: str | None,
    stem: str,
    description: dict,
    build: Callable[[], dict[str, np.ndarray]],
    group: dist.ProcessGroup | None = None,
) -> dict[str, np.ndarray]:
    """Arrays from `cache_dir/stem-HASH-NAME.npy`, built by `build()` on group rank 0 if missing.

    `description` must hold every input the arrays depend on; its hash names the files and it is
    written beside them as JSON for people. With `cache_dir=None` every process builds in memory.
    Pass a per-node `group` when the cache directory is node-local.
    """
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    paths = {name: os.path.join(cache_dir, f"{stem}-{digest}-{name}.npy") for name in _ARRAYS}
    distributed = dist.is_available() and dist.is_initialized()
    is_builder = not distributed or dist.get_rank(group) == 0
    failure: Exception | None = None
    if is_builder and not all(os.path.isfile(p) for p in paths.values()):
        try:
            _save_atomically(build(), paths, description, os.path.join(cache_dir, f"{stem}-{digest}.json"))
        except Exception as e:  # reported to every rank below, then re-raised here
            failure = e
    if distributed:
        verdict = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(verdict, src=src, group=group)
        if verdict[0] is not None and failure is None:
            raise RuntimeError(f"rank 0 failed to build the {stem} index cache in {cache_dir}: {verdict[0]}")
    if failure is not None:
        raise failure
    return {name: np.asarray(np.load(path, mmap_mode="r")) for name, path in paths.items()}


def _save_atomically(
    arrays: dict[str, np.ndarray], paths: dict[str, str], description: dict, info: str
) -> None:
    os.makedirs(os.path.dirname(info) or ".", exist_ok=True)
    for name, path in paths.items():
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, arrays[name])
        os.replace(tmp, path)
    tmp = f"{info}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(description, f, indent=1, sort_keys=True)
    os.replace(tmp, info)


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).hexdigest()


def _describe_empty(indexed: IndexedDataset, doc_ids: np.ndarray) -> str:
    """Which dataset has no tokens to offer, and what its preprocessing run kept."""
    sidecar = find_sidecar(indexed.prefix)
    origin = (
        f"its sidecar {sidecar.path} says the run {sidecar.describe_documents()}"
        if sidecar is not None
        else "no preprocessing sidecar lists it"
    )
    return (
        f"dataset {indexed.prefix} has no tokens in the {doc_ids.size} of its {len(indexed)} sequences "
        f"selected ({indexed.prefix}.bin holds {indexed.num_tokens} tokens); {origin}"
    )


class GPTDataset(torch.utils.data.Dataset):
    """`num_samples` shuffled samples of `seq_length` tokens (+1 label token) from `doc_ids`.

    Item i is a dict of tensors of length seq_length: `tokens`, `labels` (tokens shifted by one),
    `loss_mask` (float32), `position_ids`, and with `reset_attention_mask` also `segment_ids` (a new
    id after each end-of-document token, from which the model builds its block-causal mask).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        doc_ids: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        *,
        eod_id: int,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        eod_mask_loss: bool = False,
        cache_dir: str | None = None,
        name: str = "train",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if seq_length <= 0 or num_samples < 0:
            raise ValueError(
                f"{name}: seq_length ({seq_length}) must be > 0 and num_samples ({num_samples}) >= 0"
            )
        self.indexed, self.seq_length, self.eod_id = indexed, seq_length, eod_id
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.eod_mask_loss = eod_mask_loss
        doc_ids = np.asarray(doc_ids, dtype=np.int32)
        if num_samples and not indexed.sizes[doc_ids].sum(dtype=np.int64):
            raise DatasetError(f"{name}: cannot cut samples: {_describe_empty(indexed, doc_ids)}")
        description = {
            "class": "GPTDataset",
            "version": INDEX_VERSION,
            "prefix": os.path.abspath(indexed.prefix),
            "sizes": _fingerprint(indexed.sizes),
            "doc_ids": _fingerprint(doc_ids),
            "num_samples": num_samples,
            "seq_length": seq_length,
            "seed": seed,
        }
        arrays = load_or_build_cached(
            cache_dir,
            f"{name}-{os.path.basename(indexed.prefix)}",
            description,
            lambda: build_gpt_indices(indexed.sizes, doc_ids, num_samples, seq_length, seed),
            group,
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[k] for k in _ARRAYS)
        self._positions = np.arange(seq_length, dtype=np.int64)
        self._ones = np.ones(seq_length, dtype=np.float32)
        self._gatherer = self._make_gatherer()

    def _make_gatherer(self) -> _helpers.SampleGatherer:
        token_starts = self.indexed.pointers // self.indexed.dtype.itemsize  # int64 [n_seq]
        return _helpers.SampleGatherer(
            self.indexed.tokens,
            token_starts,
            self.indexed.sizes,
            self.doc_idx,
            self.sample_idx,
            self.seq_length,
        )

    def __getstate__(self) -> dict:
        # The C++ gatherer holds raw pointers; spawned DataLoader workers rebuild it.
        return {k: v for k, v in self.__dict__.items() if k != "_gatherer"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._gatherer = self._make_gatherer()

    def __len__(self) -> int:
        return int(self.shuffle_idx.size)

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of item i as int64 (inputs and the shifted labels together)."""
        return self._gatherer.gather(int(self.shuffle_idx[i]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # Built as NumPy arrays and wrapped by torch.from_numpy at the end: creating tensors by
        # torch ops or slicing costs several times more per sample.
        stream = self.sample_tokens(i)
        tokens = stream[:-1]
        if self.eod_mask_loss:
            loss_mask = (tokens != self.eod_id).astype(np.float32)
        else:
            loss_mask = self._ones.copy()  # copying a template beats np.ones
        segment_ids = None
        if self.reset_position_ids or self.reset_attention_mask:
            positions, segment_ids = _helpers.document_positions(tokens, self.eod_id)
        if not self.reset_position_ids:
            positions = self._positions.copy()
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(stream[1:]),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(positions),
        }
        if self.reset_attention_mask:
            sample["segment_ids"] = torch.from_numpy(segment_ids)
        return sample
