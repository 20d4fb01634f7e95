"""GPTDataset samples, caches and distributed builds; BlendedDataset; build_datasets."""

import json
import os
import pickle
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hang_guard import HANG_GUARD_S

from megatron_andromeda.config import DataConfig
from megatron_andromeda.data import gpt_dataset
from megatron_andromeda.data import index_reference as ref
from megatron_andromeda.data.blend import Blend
from megatron_andromeda.data.blended_dataset import BlendedDataset, samples_needed
from megatron_andromeda.data.builder import build_datasets
from megatron_andromeda.data.gpt_dataset import GPTDataset
from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter

EOD = 0


def _make(prefix, num_docs=30, seed=0, vocab=50, dtype=np.uint16):
    """Documents of 1..20 random tokens in [1, vocab), each ending with EOD."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, vocab, rng.integers(1, 20)), EOD) for _ in range(num_docs)]
    with IndexedDatasetWriter(prefix, dtype) as writer:
        writer.add_documents(docs)
    return IndexedDataset(prefix)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_samples_are_the_document_stream_in_doc_idx_order(tmp_path, dtype):
    indexed = _make(tmp_path / "d", dtype=dtype)
    doc_ids = np.arange(5, 25)  # a split: documents 5..24
    seq = 16
    total = int(indexed.sizes[doc_ids].sum())
    num_samples = 2 * total // seq + 1  # more than two epochs of tokens: three epochs
    ds = GPTDataset(indexed, doc_ids, num_samples, seq, seed=7, eod_id=EOD)
    epochs = ds.doc_idx.reshape(-1, doc_ids.size)
    assert epochs.shape[0] == 3
    for epoch in epochs:  # each epoch is a permutation of the split, not all the same one
        np.testing.assert_array_equal(np.sort(epoch), doc_ids)
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(np.sort(ds.shuffle_idx), np.arange(num_samples))
    stream = np.concatenate([indexed[d] for d in ds.doc_idx]).astype(np.int64)
    token_starts = indexed.pointers // indexed.dtype.itemsize
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        expected = stream[j * seq : j * seq + seq + 1]
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), expected[:-1])
        np.testing.assert_array_equal(item["labels"].numpy(), expected[1:])
        assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        np.testing.assert_array_equal(item["position_ids"].numpy(), np.arange(seq))
        np.testing.assert_array_equal(
            ds.sample_tokens(i),
            ref.gather_sample(indexed.tokens, token_starts, indexed.sizes, ds.doc_idx, ds.sample_idx, seq, j),
        )
    assert "segment_ids" not in ds[0] and bool(ds[0]["loss_mask"].all())


def test_reset_attention_mask_and_positions(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_documents([[5, 6, EOD], [7, EOD], [8, 9, 9, EOD]])
    indexed = IndexedDataset(tmp_path / "d")
    ds = GPTDataset(
        indexed,
        np.arange(3),
        1,
        8,
        seed=0,
        eod_id=EOD,
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
    )
    item = ds[0]
    tokens = item["tokens"].numpy()
    docs_in_order = np.concatenate([indexed[d] for d in ds.doc_idx])[:8]
    np.testing.assert_array_equal(tokens, docs_in_order)
    eods = np.flatnonzero(tokens == EOD)
    # Each EOD closes its segment: ids step up right after it, positions restart there.
    expected_segments = np.searchsorted(eods, np.arange(8), side="left")
    np.testing.assert_array_equal(item["segment_ids"].numpy(), expected_segments)
    starts = np.concatenate([[0], eods + 1])
    expected_positions = np.arange(8) - starts[expected_segments]
    np.testing.assert_array_equal(item["position_ids"].numpy(), expected_positions)
    np.testing.assert_array_equal(item["loss_mask"].numpy(), (tokens != EOD).astype(np.float32))


def test_dataset_pickles_for_spawned_workers(tmp_path):
    ds = GPTDataset(_make(tmp_path / "d"), np.arange(30), 20, 8, seed=1, eod_id=EOD)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.indexed.prefix == ds.indexed.prefix
    for i in (0, 7, 19):
        np.testing.assert_array_equal(clone[i]["labels"], ds[i]["labels"])


def test_index_cache_is_built_once_and_keyed_by_parameters(tmp_path, monkeypatch):
    indexed = _make(tmp_path / "d")
    cache = tmp_path / "cache"
    first = GPTDataset(indexed, np.arange(30), 20, 8, seed=1, eod_id=EOD, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == 3 and len(list(cache.glob("*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", fail)
    again = GPTDataset(indexed, np.arange(30), 20, 8, seed=1, eod_id=EOD, cache_dir=str(cache))
    np.testing.assert_array_equal(again.shuffle_idx, first.shuffle_idx)
    np.testing.assert_array_equal(again[3]["tokens"], first[3]["tokens"])
    with pytest.raises(AssertionError, match="cache should"):  # another seed is another cache
        GPTDataset(indexed, np.arange(30), 20, 8, seed=2, eod_id=EOD, cache_dir=str(cache))


def _distributed_build(rank, world, tmp_path, cache_dirs):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=rank, world_size=world)
    results = {}
    try:
        for case, cache_dir in cache_dirs.items():
            try:
                ds = GPTDataset(
                    IndexedDataset(tmp_path / "d"), np.arange(30), 25, 8, 3, eod_id=EOD, cache_dir=cache_dir
                )
                results[case] = ["ok", ds.shuffle_idx.tolist()]
            except Exception as e:
                results[case] = [type(e).__name__, str(e)]
    finally:
        dist.destroy_process_group()
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(results))


def test_distributed_cache_build_and_failure(tmp_path):
    _make(tmp_path / "d")
    broken = tmp_path / "broken"  # rank 0 cannot create this cache directory: all ranks must raise
    broken.write_text("a file where the cache directory should be")
    cache_dirs = {"good": str(tmp_path / "cache"), "broken": str(broken)}
    context = mp.get_context("fork")  # forked ranks skip re-importing torch
    ranks = [context.Process(target=_distributed_build, args=(r, 2, tmp_path, cache_dirs)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=HANG_GUARD_S)
        if process.exitcode is None:  # hung: a failed build must never leave a rank waiting
            process.kill()
        assert process.exitcode == 0
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = GPTDataset(IndexedDataset(tmp_path / "d"), np.arange(30), 25, 8, 3, eod_id=EOD)
    assert results[0]["good"] == results[1]["good"] == ["ok", single.shuffle_idx.tolist()]
    assert results[0]["broken"][0] in ("FileExistsError", "NotADirectoryError")
    assert results[1]["broken"][0] == "RuntimeError" and "rank 0 failed to build" in results[1]["broken"][1]


def _sources(tmp_path, n=3):
    return [
        GPTDataset(_make(tmp_path / f"s{k}", seed=k), np.arange(30), 60, 8, seed=k, eod_id=EOD)
        for k in range(n)
    ]


def test_blended_items_come_from_their_sources(tmp_path):
    sources = _sources(tmp_path)
    blend = BlendedDataset(sources, [0.5, 0.3, 0.2], 100)
    assert len(blend) == 100
    np.testing.assert_allclose(blend.weights, [0.5, 0.3, 0.2])
    counts = blend.source_counts(100)
    assert np.all(np.abs(counts - np.array([50, 30, 20])) <= 1)
    assert np.all(counts <= samples_needed([0.5, 0.3, 0.2], 100))
    for i in range(0, 100, 7):
        k, j = int(blend.dataset_index[i]), int(blend.dataset_sample_index[i])
        np.testing.assert_array_equal(blend[i]["tokens"], sources[k][j]["tokens"])
    resumed = BlendedDataset(sources, [0.5, 0.3, 0.2], 100)  # resume = rebuild and start at any index
    np.testing.assert_array_equal(resumed[63]["tokens"], blend[63]["tokens"])


def test_token_budget_blend_takes_exact_counts(tmp_path):
    sources = _sources(tmp_path)
    blend = BlendedDataset.from_token_budgets(sources, [80, 160, 24], seq_length=8)
    np.testing.assert_array_equal(blend.source_counts(len(blend)), [10, 20, 3])


def test_blend_refuses_a_too_small_source(tmp_path):
    sources = _sources(tmp_path, 2)
    with pytest.raises(ValueError, match="blend source 1 has 60 samples but the blend takes"):
        BlendedDataset(sources, [0.2, 0.8], 100)


def test_blend_lists_are_parsed_and_normalised_once():
    one = Blend.parse(["a"], "data.train")
    assert one.prefixes == ["a"] and one.weights.tolist() == [1.0] and one.names == ["a"]
    two = Blend.parse(["7", "x/a", "3", "y/a"], "data.train")  # raw weights: shares come out
    assert two.weights.tolist() == [0.7, 0.3] and two.names == ["x/a", "y/a"]
    assert Blend.parse(["p", "q"], "data.train").weights.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="data.valid: a weighted blend alternates"):
        Blend.parse(["0.7", "a", "0.3"], "data.valid")
    with pytest.raises(ValueError, match="data.train: the weights sum to zero"):
        Blend.parse(["0", "a"], "data.train")
    with pytest.raises(ValueError, match="shares summing to 1"):
        BlendedDataset([[], []], [5, 3], 10)  # unnormalised weights are refused, not renormalised


def test_build_datasets_end_to_end(tmp_path):
    _make(tmp_path / "a", seed=1)
    _make(tmp_path / "b", seed=2)
    cfg = DataConfig(
        train=["0.6", str(tmp_path / "a"), "0.4", str(tmp_path / "b")],
        valid=[str(tmp_path / "b")],
        cache_dir=str(tmp_path / "cache"),
    )
    tokenizer = types.SimpleNamespace(eod_id=EOD)
    train, valid, test = build_datasets(cfg, tokenizer, (50, 10, 5), seq_length=8, vocab_size=50)
    assert isinstance(train, BlendedDataset) and len(train) == 50
    assert isinstance(valid, GPTDataset) and len(valid) == 10 and test is None
    assert train[49]["tokens"].shape == (8,)
    assert os.listdir(tmp_path / "cache")


def test_build_datasets_reports_bad_inputs(tmp_path):
    _make(tmp_path / "a", vocab=50)
    tokenizer = types.SimpleNamespace(eod_id=EOD)
    missing = DataConfig(train=[str(tmp_path / "absent")])
    with pytest.raises(DatasetError, match=r"data.train: dataset .*absent.*tools/preprocess_data\.py"):
        build_datasets(missing, tokenizer, (10, 0, 0), 8, 50)
    too_big = DataConfig(train=[str(tmp_path / "a")])
    with pytest.raises(DatasetError, match=r"a\.bin: largest token id 4\d does not fit model\.vocab_size=40"):
        build_datasets(too_big, tokenizer, (10, 0, 0), 8, 40)


def test_build_datasets_from_a_token_budget_recipe(tmp_path):
    _make(tmp_path / "a_train_text_document", seed=1)
    _make(tmp_path / "b_train_text_document", seed=2)
    recipe = tmp_path / "stage.yaml"
    recipe.write_text(
        "sources:\n"
        f"  - {{name: a, prefix: {tmp_path / 'a'}, tokens: 3.0e9}}\n"
        f"  - {{name: b, prefix: {tmp_path / 'b'}, tokens: 1.0e9}}\n"
    )
    cfg = DataConfig(recipe=str(recipe), cache_dir=str(tmp_path / "cache"))
    train, valid, _ = build_datasets(cfg, types.SimpleNamespace(eod_id=EOD), (40, 0, 0), 8, 50)
    assert isinstance(train, BlendedDataset) and valid is None
    np.testing.assert_allclose(train.weights, [0.75, 0.25])
    np.testing.assert_array_equal(train.source_counts(40), [30, 10])
