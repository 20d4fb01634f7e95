"""The C++ index builders equal their NumPy references, and blends keep every prefix on target."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_andromeda.data import _helpers
from megatron_andromeda.data import index_helpers as fast
from megatron_andromeda.data import index_reference as ref

SETTINGS = settings(max_examples=60, deadline=None)


def _running_counts(dataset_index: np.ndarray, num_sources: int) -> np.ndarray:
    """[size, num_sources]: how many times each source was chosen in the first s+1 slots."""
    one_hot = np.zeros((dataset_index.size, num_sources), dtype=np.int64)
    one_hot[np.arange(dataset_index.size), dataset_index.astype(np.int64)] = 1
    return one_hot.cumsum(axis=0)


@st.composite
def sample_idx_inputs(draw):
    sizes = np.array(draw(st.lists(st.integers(0, 40), min_size=1, max_size=30)), dtype=np.int32)
    epochs = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    doc_idx = np.concatenate([rng.permutation(sizes.size) for _ in range(epochs)]).astype(np.int32)
    seq_length = draw(st.integers(1, 50))
    total = int(sizes[doc_idx].sum())
    max_samples = max(0, (total - 1) // seq_length)
    num_samples = draw(st.integers(0, max_samples))
    return sizes, doc_idx, seq_length, num_samples


@SETTINGS
@given(sample_idx_inputs(), st.booleans())
def test_build_sample_idx_matches_reference(inputs, use_int64):
    sizes, doc_idx, seq_length, num_samples = inputs
    expected = ref.build_sample_idx(sizes, doc_idx, seq_length, num_samples)
    got = _helpers.build_sample_idx(sizes, doc_idx, seq_length, num_samples, use_int64)
    assert got.dtype == (np.int64 if use_int64 else np.int32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(fast.build_sample_idx(sizes, doc_idx, seq_length, num_samples), expected)


def test_sample_idx_covers_seq_length_plus_one_tokens():
    sizes = np.array([5, 0, 3, 7, 2], dtype=np.int32)
    doc_idx = np.array([0, 1, 2, 3, 4, 0, 2], dtype=np.int32)
    idx = fast.build_sample_idx(sizes, doc_idx, 4, 5)
    starts = np.concatenate([[0], np.cumsum(sizes[doc_idx])[:-1]])
    for i in range(5):
        begin = starts[idx[i, 0]] + idx[i, 1]
        end = starts[idx[i + 1, 0]] + idx[i + 1, 1]
        assert begin == 4 * i and end - begin == 4  # inclusive end: 5 tokens, one shared


def test_sample_idx_refuses_too_few_tokens():
    sizes = np.array([4, 4], dtype=np.int32)
    with pytest.raises(ValueError, match="need 9 tokens"):
        fast.build_sample_idx(sizes, np.array([0, 1], np.int32), 4, 2)


weights_strategy = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1.0), st.floats(1e-12, 1e-9)), min_size=1, max_size=9
).filter(lambda w: sum(w) > 0)


@SETTINGS
@given(weights_strategy, st.integers(0, 400))
def test_blending_matches_reference_and_stays_within_one_sample(weights, size):
    dataset_index, sample_index = fast.build_blending_indices(weights, size)
    numerators = fast.weights_to_numerators(weights)
    ref_index, ref_sample = ref.build_blending_indices(numerators, fast.WEIGHT_DENOMINATOR, size)
    np.testing.assert_array_equal(dataset_index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)
    if size == 0:
        return
    w = np.asarray(weights) / np.sum(weights)
    counts = _running_counts(dataset_index, len(weights))
    targets = np.outer(np.arange(1, size + 1), w)
    assert np.abs(counts - targets).max() <= 1 + 1e-9
    # dataset_sample_index numbers each source's samples 0, 1, 2, ...
    chosen = counts[np.arange(size), dataset_index.astype(np.int64)] - 1
    np.testing.assert_array_equal(sample_index, chosen)


@pytest.mark.parametrize("num_sources", [3, 100])  # the scan path and the heap path
def test_blending_with_vanishing_weights_matches_reference(num_sources):
    weights = np.full(num_sources, 1e-18)  # first deadlines far past any real blend
    weights[0] = 1.0
    dataset_index, sample_index = fast.build_blending_indices(weights, 50)
    assert np.all(dataset_index == 0)  # 50 slots are far too few to owe the others a sample
    ref_index, ref_sample = ref.build_blending_indices(
        fast.weights_to_numerators(weights), fast.WEIGHT_DENOMINATOR, 50
    )
    np.testing.assert_array_equal(dataset_index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)


def test_blending_many_sources_uses_heap_path_and_matches_reference():
    rng = np.random.default_rng(3)
    weights = rng.random(300) ** 3
    dataset_index, sample_index = fast.build_blending_indices(weights, 2000)
    assert dataset_index.dtype == np.int16
    ref_index, ref_sample = ref.build_blending_indices(
        fast.weights_to_numerators(weights), fast.WEIGHT_DENOMINATOR, 2000
    )
    np.testing.assert_array_equal(dataset_index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)


@SETTINGS
@given(st.lists(st.integers(0, 60), min_size=1, max_size=8).filter(lambda c: sum(c) > 0))
def test_exhaustive_blend_takes_exact_counts(counts):
    dataset_index, sample_index = fast.build_exhaustive_blending_indices(counts)
    assert dataset_index.size == sum(counts)
    np.testing.assert_array_equal(np.bincount(dataset_index, minlength=len(counts)), counts)
    ref_index, ref_sample = ref.build_blending_indices(np.array(counts), sum(counts), sum(counts))
    np.testing.assert_array_equal(dataset_index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -0.5], [float("nan"), 1.0]])
def test_bad_blend_weights_are_refused(weights):
    with pytest.raises(ValueError, match="blend weights"):
        fast.build_blending_indices(weights, 10)


@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=1, max_size=64), st.integers(0, 3))
def test_document_positions_matches_reference(tokens, eod_id):
    tokens = np.array(tokens, dtype=np.int64)
    positions, segments = _helpers.document_positions(tokens, eod_id)
    ref_positions, ref_segments = ref.document_positions(tokens, eod_id)
    np.testing.assert_array_equal(positions, ref_positions)
    np.testing.assert_array_equal(segments, ref_segments)
