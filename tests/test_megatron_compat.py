"""Megatron-LM compatibility of the `.bin`/`.idx` format, checked against megatron-core itself.

megatron-core (a `[dev]` dependency: pure Python, needs only torch, numpy and packaging) reads what
our writer wrote, and our reader reads what megatron-core's `IndexedDatasetBuilder` wrote: the same
tokens, sequence lengths and document boundaries, for both token dtypes and for multi-sequence
documents. Writing the same documents with both writers must also give byte-identical files.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_andromeda.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetWriter,
    data_file_path,
    index_file_path,
)


def random_documents(dtype: np.dtype, count: int = 40, seed: int = 0) -> list[list[np.ndarray]]:
    """Documents of 1-3 sequences each, some of them empty, ids spanning the dtype's range."""
    rng = np.random.default_rng(seed)
    high = int(np.iinfo(dtype).max) if dtype == np.uint16 else 200_000
    return [
        [rng.integers(0, high, size=rng.integers(0, 50)).astype(dtype) for _ in range(rng.integers(1, 4))]
        for _ in range(count)
    ]


def write_ours(prefix: str, documents: list[list[np.ndarray]], dtype: np.dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for sequences in documents:
            writer.add_document_sequences(sequences)


def write_megatron(prefix: str, documents: list[list[np.ndarray]], dtype: np.dtype) -> None:
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    for sequences in documents:
        for sequence in sequences:
            builder.add_item(torch.from_numpy(sequence.astype(np.int64)))
        builder.end_document()
    builder.finalize(index_file_path(prefix))


def flat(documents: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [sequence for sequences in documents for sequence in sequences]


def document_starts(documents: list[list[np.ndarray]]) -> np.ndarray:
    return np.cumsum([0] + [len(sequences) for sequences in documents])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32], ids=["uint16", "int32"])
def test_megatron_core_reads_ours(tmp_path, dtype):
    documents = random_documents(dtype)
    prefix = str(tmp_path / "ours")
    write_ours(prefix, documents, dtype)

    theirs = MegatronIndexedDataset(prefix, mmap=True)
    sequences = flat(documents)
    assert len(theirs) == len(sequences) and theirs.index.dtype == dtype
    np.testing.assert_array_equal(theirs.sequence_lengths, [len(s) for s in sequences])
    np.testing.assert_array_equal(theirs.document_indices, document_starts(documents))
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(theirs[i], sequence)
    if len(sequences[3]) > 2:  # a partial read, as GPTDataset does it
        np.testing.assert_array_equal(theirs.get(3, offset=1, length=2), sequences[3][1:3])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32], ids=["uint16", "int32"])
def test_we_read_megatron_core_datasets_and_write_the_same_bytes(tmp_path, dtype):
    documents = random_documents(dtype, seed=1)
    theirs_prefix, ours_prefix = str(tmp_path / "theirs"), str(tmp_path / "ours")
    write_megatron(theirs_prefix, documents, dtype)

    ours = IndexedDataset(theirs_prefix)
    sequences = flat(documents)
    assert len(ours) == len(sequences) and ours.dtype == dtype
    np.testing.assert_array_equal(ours.document_indices, document_starts(documents))
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(ours[i], sequence)

    write_ours(ours_prefix, documents, dtype)
    for path in (data_file_path, index_file_path):
        assert filecmp.cmp(path(theirs_prefix), path(ours_prefix), shallow=False), path.__name__
