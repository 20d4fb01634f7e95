"""End-to-end runs of the preprocessing pipeline on tiny files (tiny BPE tokenizer trained here)."""

import gzip
import hashlib
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tiny_tokenizer import train_tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_andromeda.data.indexed_dataset import IndexedDataset
from megatron_andromeda.preprocess import pipeline
from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.cli import main
from megatron_andromeda.preprocess.dedup import MinHasher
from megatron_andromeda.preprocess.pipeline import PreprocessConfig, run

_rng = random.Random(0)
VOCAB = ["".join(_rng.choice("abcdefghilmnoprstuvy") for _ in range(_rng.randint(3, 8))) for _ in range(400)]


def prose(seed, words=120):
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        n = rng.randint(8, 14)
        sentences.append(" ".join(rng.choice(VOCAB) for _ in range(n)).capitalize() + ".")
        count += n
    return "\n".join(" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A GPT-NeoX-style byte-level BPE, vocabulary ~300, with <|endoftext|>."""
    return train_tiny_tokenizer(
        tmp_path_factory.mktemp("tok") / "tokenizer.json", [prose(i) for i in range(30)]
    )


def write_jsonl(path, texts, key="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


def config(tmp_path, inputs, tokenizer_path, **kw):
    base = dict(
        inputs=tuple(inputs), output_prefix=str(tmp_path / "out" / "corpus"), tokenizer=tokenizer_path,
        workers=0, split=None, append_eod=True, cleaning=None, exact_dedup=False, minhash=None,
    )  # fmt: skip
    base.update(kw)
    return PreprocessConfig(**base)


def peer_style(tmp_path, texts, tokenizer_path):
    """An independent re-implementation of Megatron-LM's loop and its documented .bin/.idx layout."""
    tok = Tokenizer.from_file(tokenizer_path)
    eod = tok.token_to_id("<|endoftext|>")
    docs = [np.array(tok.encode(t, add_special_tokens=False).ids + [eod], dtype=np.uint16) for t in texts]
    sizes = np.array([d.size for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).astype(np.int64) * 2
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1)
    idx = header + sizes.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes()
    return b"".join(d.tobytes() for d in docs), idx


def read_bytes(prefix):
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def test_byte_identical_to_megatron_style_loop(tmp_path, tokenizer_path):
    texts = [prose(i, words=_rng.randint(5, 200)) for i in range(60)] + ["", "ünïcödé ☃ text", "tab\there"]
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    report = run(config(tmp_path, [path], tokenizer_path, chunk_bytes=2000))
    ours = read_bytes(str(tmp_path / "out" / "corpus_text_document"))
    assert ours == peer_style(tmp_path, texts, tokenizer_path)
    assert report["dtype"] == "uint16" and report["documents"]["kept"] == len(texts)


@pytest.mark.slow
def test_worker_processes_give_the_same_bytes(tmp_path, tokenizer_path):
    texts = [prose(i) for i in range(80)] + [prose(3)]  # one exact duplicate
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    kw = dict(split=(0.8, 0.1, 0.1), exact_dedup=True, minhash=MinHasher(), chunk_bytes=3000)
    single = run(config(tmp_path / "a", [path], tokenizer_path, workers=0, **kw))
    multi = run(config(tmp_path / "b", [path], tokenizer_path, workers=2, **kw))
    for name, out in single["outputs"].items():
        assert read_bytes(out["prefix"]) == read_bytes(multi["outputs"][name]["prefix"])
    assert single["dropped"] == multi["dropped"]


def test_every_input_format_and_multiple_files(tmp_path, tokenizer_path):
    texts = [prose(i) for i in range(9)]
    a = write_jsonl(tmp_path / "a.jsonl.gz", texts[:3])
    pq.write_table(pa.table({"text": texts[3:6]}), tmp_path / "b.parquet")
    with zstandard.open(tmp_path / "c.jsonl.zst", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[6:])
    inputs = [a, str(tmp_path / "*.parquet"), str(tmp_path / "c.jsonl.zst")]
    report = run(config(tmp_path, inputs, tokenizer_path, append_eod=False))
    ds = IndexedDataset(report["outputs"]["all/text"]["prefix"])
    tok = Tokenizer.from_file(tokenizer_path)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t).ids for t in texts]
    assert [i["format"] for i in report["inputs"]] == ["jsonl", "parquet", "jsonl"]


def test_malformed_records_are_counted_with_file_and_line(tmp_path, tokenizer_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n\n{"text": "caf\xe9"}\n{broken\n'
        b'{"body": "x"}\n{"text": 3}\n{"text": "good two"}\n'
    )
    report = run(config(tmp_path, [str(path)], tokenizer_path))
    dropped = report["dropped"]
    assert {r: d["count"] for r, d in dropped.items()} == {
        "empty_line": 1, "invalid_utf8": 1, "invalid_json": 1, "missing_key": 1, "non_string": 1,
    }  # fmt: skip
    assert dropped["invalid_json"]["samples"] == [f"{path}:4"]
    assert dropped["non_string"]["samples"] == [f"{path}:6"]
    assert report["documents"] == {"read": 7, "kept": 2, "dropped": 5, "malformed": 5}


def test_exact_and_near_duplicates_across_files(tmp_path, tokenizer_path):
    docs = [prose(i, words=300) for i in range(6)]
    near = docs[1].replace(".", "!", 2)  # a couple of words differ
    first = write_jsonl(tmp_path / "one.jsonl", docs[:4])
    second = write_jsonl(tmp_path / "two.jsonl", [docs[0].upper(), near, docs[4], docs[5]])
    report = run(config(tmp_path, [first, second], tokenizer_path, exact_dedup=True, minhash=MinHasher()))
    dropped = report["dropped"]
    assert dropped["exact_duplicate"] == {"count": 1, "samples": [f"{second}:1"]}
    assert dropped["near_duplicate"] == {"count": 1, "samples": [f"{second}:2"]}
    assert report["outputs"]["all/text"]["documents"] == 6
    no_near = run(config(tmp_path / "x", [first, second], tokenizer_path, exact_dedup=True))
    assert no_near["outputs"]["all/text"]["documents"] == 7


def test_split_is_stable_when_files_are_added(tmp_path, tokenizer_path):
    old = write_jsonl(tmp_path / "old.jsonl", [prose(i, 40) for i in range(150)])
    new = write_jsonl(tmp_path / "new.jsonl", [prose(1000 + i, 40) for i in range(150)])

    def placement(inputs, out):
        report = run(config(tmp_path / out, inputs, tokenizer_path, split=(0.6, 0.2, 0.2), append_eod=False))
        tok = Tokenizer.from_file(tokenizer_path)
        where = {}
        for name, item in report["outputs"].items():
            ds = IndexedDataset(item["prefix"])
            for i in range(len(ds)):
                where[tok.decode(ds[i].tolist())] = name
        return where

    before = placement([old], "a")
    after = placement([new, old], "b")
    assert set(before.values()) == {"train/text", "valid/text", "test/text"}
    assert all(after[text] == split for text, split in before.items())
    assert len(after) == 300


def test_sidecar_contents(tmp_path, tokenizer_path):
    texts = [prose(i) for i in range(20)] + ["too short"]
    path = write_jsonl(tmp_path / "in.jsonl", texts, key="content")
    cfg = config(tmp_path, [path], tokenizer_path, json_keys=("content",), split=(0.5, 0.5, 0.0),
                 cleaning=CleaningConfig(min_words=20), exact_dedup=True)  # fmt: skip
    report = run(cfg)
    with open(cfg.sidecar_path()) as f:
        sidecar = json.load(f)
    assert sidecar == report
    tok = Tokenizer.from_file(tokenizer_path)
    assert sidecar["tokenizer"]["sha256"] == hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    assert sidecar["tokenizer"]["vocab_size"] == tok.get_vocab_size() and sidecar["dtype"] == "uint16"
    assert sidecar["dropped"]["too_few_words"]["samples"] == [f"{path}:21"]
    assert sidecar["documents"]["read"] == 21 and sidecar["documents"]["kept"] == 20
    assert set(sidecar["outputs"]) == {"train/content", "valid/content"}
    for item in sidecar["outputs"].values():
        ds = IndexedDataset(item["prefix"])
        assert (ds.num_documents, ds.num_tokens) == (item["documents"], item["tokens"])
        assert item["prefix"].endswith(("corpus_train_content_document", "corpus_valid_content_document"))
    assert sidecar["tokens"] == sum(i["tokens"] for i in sidecar["outputs"].values())
    entry = sidecar["inputs"][0]
    assert entry["bytes"] == os.path.getsize(path)
    assert entry["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert (
        sidecar["options"]["json_keys"] == ["content"] and sidecar["options"]["cleaning"]["min_words"] == 20
    )


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, tokenizer_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [prose(i) for i in range(30)])
    cfg = config(tmp_path, [path], tokenizer_path, split=(0.5, 0.25, 0.25))
    run(cfg)  # a complete earlier run, then a rerun that dies half-way through finalising
    calls = []
    real = pipeline.IndexedDatasetWriter.finalize

    def finalize_then_die(self):
        calls.append(self.prefix)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(pipeline.IndexedDatasetWriter, "finalize", finalize_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert os.listdir(tmp_path / "out") == []  # no sidecar, no datasets, no temporaries


def test_exception_while_processing_removes_temporaries(tmp_path, tokenizer_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [prose(i) for i in range(30)])

    def boom(self, result, keep):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline._Outputs, "add", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run(config(tmp_path, [path], tokenizer_path))
    assert os.listdir(tmp_path / "out") == []


def test_dtype_is_int32_for_large_vocabularies(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = str(tmp_path / "big.json")
    tok.save(tok_path)
    path = write_jsonl(tmp_path / "in.jsonl", ["w1 w69999 w65536", "w65535 w2"])
    report = run(config(tmp_path, [path], tok_path))
    ds = IndexedDataset(report["outputs"]["all/text"]["prefix"])
    assert report["dtype"] == "int32" and ds.dtype == np.int32
    assert ds[0].tolist() == [1, 69999, 65536, 70000] and ds[1].tolist() == [65535, 2, 70000]


def test_multiple_json_keys_make_aligned_datasets(tmp_path, tokenizer_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            f.write(json.dumps({"q": f"question {i}", "a": prose(i, 20)}) + "\n")
        f.write(json.dumps({"q": "no answer"}) + "\n")
    report = run(config(tmp_path, [str(path)], tokenizer_path, json_keys=("q", "a"), append_eod=False))
    q, a = (IndexedDataset(report["outputs"][f"all/{k}"]["prefix"]) for k in ("q", "a"))
    tok = Tokenizer.from_file(tokenizer_path)
    assert len(q) == len(a) == 5 and report["dropped"]["missing_key"]["count"] == 1
    assert tok.decode(q[3].tolist()) == "question 3" and tok.decode(a[3].tolist()) == prose(3, 20)
    assert report["outputs"]["all/q"]["prefix"].endswith("corpus_q_document")


def test_cli_end_to_end_and_errors(tmp_path, tokenizer_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [prose(i) for i in range(10)])
    prefix = str(tmp_path / "cli" / "data")
    args = ["--input", path, "--output-prefix", prefix, "--tokenizer", tokenizer_path, "--workers", "0"]
    assert main(args + ["--append-eod", "--split", "70,30", "--clean-set", "min_words=5"]) == 0
    assert os.path.exists(prefix + "_train_text_document.bin") and os.path.exists(prefix + ".json")
    assert not os.path.exists(prefix + "_test_text_document.bin")  # zero weight: no dataset
    assert main(args + ["--no-split", "--no-clean", "--no-dedup"]) == 0
    assert os.path.exists(prefix + "_text_document.idx")
    assert main(args[:1] + [str(tmp_path / "missing.jsonl")] + args[2:]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(args + ["--clean-set", "bogus=1"]) == 2
    assert "unknown cleaning option" in capsys.readouterr().err
    assert main(args + ["--split", "x"]) == 2


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(prose(i, 40) for i in range(40)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=120, model_type="bpe",
        minloglevel=2, num_threads=1,
    )  # fmt: skip
    model = str(tmp_path / "sp.model")
    texts = [prose(100 + i, 30) for i in range(5)]
    report = run(config(tmp_path, [write_jsonl(tmp_path / "in.jsonl", texts)], model))
    sp = spm.SentencePieceProcessor(model_file=model)
    ds = IndexedDataset(report["outputs"]["all/text"]["prefix"])
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [sp.eos_id()] for t in texts]
    assert report["tokenizer"]["vocab_size"] == 120 and report["tokenizer"]["eod_id"] == sp.eos_id()
