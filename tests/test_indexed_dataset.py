"""The mmap indexed format: byte layout, round trip, atomic writes and validation errors."""

import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_andromeda.data.indexed_dataset import (
    DatasetError,
    IndexedDataset,
    IndexedDatasetWriter,
    validate_indexed_dataset,
)

DOCS = [[5, 6, 7], [1], [], [9, 8, 7, 6, 5]]


def _write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        writer.add_document(docs[0])
        writer.add_documents([np.array(d) for d in docs[1:]])
    return str(prefix)


def test_bytes_match_hand_built_megatron_layout(tmp_path):
    _write(tmp_path / "d")
    sizes = [len(d) for d in DOCS]
    pointers = [0, 6, 8, 8]  # byte offsets of uint16 sequences
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 4)  # sequences
        + struct.pack("<Q", 5)  # document_indices entries: documents + 1
        + struct.pack("<4i", *sizes)
        + struct.pack("<4q", *pointers)
        + struct.pack("<5q", 0, 1, 2, 3, 4)
    )
    assert (tmp_path / "d.idx").read_bytes() == expected_idx
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<9H", 5, 6, 7, 1, 9, 8, 7, 6, 5)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]  # temporaries renamed away


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 120, rng.integers(0, 50)) for _ in range(40)]
    dataset = IndexedDataset(_write(tmp_path / "d", docs, dtype))
    assert len(dataset) == 40 and dataset.dtype == np.dtype(dtype)
    assert dataset.sizes.dtype == np.int32 and dataset.num_tokens == sum(d.size for d in docs)
    np.testing.assert_array_equal(dataset.document_indices, np.arange(41))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(dataset[i], doc)
    view = dataset.get(3, offset=1, length=2)
    np.testing.assert_array_equal(view, docs[3][1:3])
    assert not view.flags.owndata  # a view into the memory map, no copy


def test_multi_sequence_document(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.int32) as writer:
        writer.add_document_sequences([[1, 2], [3]])
        writer.add_document([4])
    dataset = IndexedDataset(tmp_path / "d")
    np.testing.assert_array_equal(dataset.document_indices, [0, 2, 3])
    assert dataset.num_documents == 2 and len(dataset) == 3


def test_exception_aborts_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_best_dtype_fits_every_id():
    assert IndexedDatasetWriter.best_dtype(65536) == np.uint16  # ids 0..65535
    assert IndexedDatasetWriter.best_dtype(65537) == np.int32
    assert IndexedDatasetWriter.best_dtype(50277) == np.uint16


def test_validate_summarises(tmp_path):
    summary = validate_indexed_dataset(_write(tmp_path / "d"), vocab_size=10)
    assert (summary.num_documents, summary.num_tokens, summary.max_token_id) == (4, 9, 9)


def test_truncated_bin_is_reported(tmp_path):
    prefix = _write(tmp_path / "d")
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DatasetError, match=r"d\.bin: 10 bytes but .*d\.idx describes 18"):
        IndexedDataset(prefix)


def test_bad_magic_is_reported(tmp_path):
    prefix = _write(tmp_path / "d")
    data = bytearray((tmp_path / "d.idx").read_bytes())
    data[:4] = b"JUNK"
    (tmp_path / "d.idx").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"d\.idx: bad magic"):
        validate_indexed_dataset(prefix)


def test_truncated_idx_is_reported(tmp_path):
    prefix = _write(tmp_path / "d")
    data = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(data[:-8])
    with pytest.raises(DatasetError, match=r"d\.idx: .* truncated or corrupt"):
        IndexedDataset(prefix)


def test_token_beyond_vocab_is_reported(tmp_path):
    prefix = _write(tmp_path / "d")
    with pytest.raises(DatasetError, match=r"d\.bin: token id 9 >= vocab_size 9.*model\.vocab_size"):
        validate_indexed_dataset(prefix, vocab_size=9)


def test_missing_dataset_points_at_preprocessing(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.idx: file not found.*tools/preprocess_data\.py"):
        IndexedDataset(tmp_path / "nope")


def test_unknown_dtype_code_is_reported(tmp_path):
    prefix = _write(tmp_path / "d")
    data = bytearray((tmp_path / "d.idx").read_bytes())
    data[17] = 42  # the dtype code byte after magic (9) and version (8)
    (tmp_path / "d.idx").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="unknown dtype code 42"):
        IndexedDataset(prefix)


def test_validate_tool_exit_codes(tmp_path, capsys):
    tool = Path(__file__).resolve().parents[1] / "tools" / "validate_dataset.py"
    spec = importlib.util.spec_from_file_location("validate_dataset", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main

    prefix = _write(tmp_path / "d")
    assert main([prefix, "--vocab-size", "10"]) == 0
    assert "4 documents" in capsys.readouterr().out
    assert main([prefix, str(tmp_path / "missing"), "--vocab-size", "10"]) == 1
    assert "missing.idx: file not found" in capsys.readouterr().err
