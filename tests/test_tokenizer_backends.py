"""The tokenizer backend choice (data/tokenizer.py): gigatoken and the reference libraries give the
same datasets, the identity check stops a run where they would not, and `auto` falls back, saying
why, when gigatoken is missing or cannot reproduce the tokenizer."""

import dataclasses
import json
import random
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from megatron_andromeda.config import TOKENIZER_BACKEND_CHOICES, ConfigError, DataConfig
from megatron_andromeda.data.indexed_dataset import IndexedDataset
from megatron_andromeda.data.tokenizer import (
    TOKENIZER_BACKENDS,
    GigatokenTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerBackendError,
    load_tokenizer,
    probe_texts,
)
from megatron_andromeda.preprocess import pipeline
from megatron_andromeda.preprocess.cli import main
from megatron_andromeda.preprocess.pipeline import PreprocessConfig, plan_execution, run

_rng = random.Random(3)
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve", "über", "日本語", "🎉",
    "über-long", "words", "42", "3.14",
]  # fmt: skip

# Documents where byte-level BPE implementations tend to differ.
EDGE_DOCUMENTS = [
    "",
    " ",
    "   \n\t  \r\n ",
    "hello<|endoftext|>world and <|padding|> inside text",
    "<|endoftext|>",
    "e\u0301 cafe\u0301 A\u030a combining marks (NFC changes these)",
    "👩\u200d👩\u200d👧 emoji 🎉🎉 👍🏽 flags 🇺🇳",
    "x" * 3000,
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2000)),
    "tabs\tand\x00nul\x01controls\u200b zero width",
    "日本語のテキストと中文 mixed with English, Ελληνικά and العربية",
    "ﬁ ligature ＡＢＣ fullwidth ① circled",
]


def corpus_texts(n=40):
    rng = random.Random(5)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A GPT-NeoX-style tokenizer: NFC, byte-level BPE, <|endoftext|> and <|padding|>."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False,
        special_tokens=["<|endoftext|>", "<|padding|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus_texts(200) + EDGE_DOCUMENTS, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "edge.jsonl"
    texts = corpus_texts() + EDGE_DOCUMENTS + ["MARKER " + t for t in corpus_texts(3)]
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return str(path), texts


def preprocess(tmp_path, name, inputs, tokenizer, **kw):
    base = dict(
        inputs=tuple(inputs), output_prefix=str(tmp_path / name / "corpus"), tokenizer=tokenizer,
        workers=0, split=(0.6, 0.2, 0.2), append_eod=True, cleaning=None, exact_dedup=False, minhash=None,
        chunk_bytes=700,
    )  # fmt: skip
    base.update(kw)
    return run(PreprocessConfig(**base))


def dataset_bytes(report):
    out = {}
    for name, entry in sorted(report["outputs"].items()):
        for ext in ("bin", "idx"):
            with open(f"{entry['prefix']}.{ext}", "rb") as f:
                out[f"{name}.{ext}"] = f.read()
    return out


def without_gigatoken(monkeypatch):
    """Make `import gigatoken` fail, as on an install without the [fast] extra."""
    monkeypatch.setitem(sys.modules, "gigatoken", None)


def test_both_backends_give_byte_identical_datasets(tmp_path, tokenizer_path, corpus):
    path, texts = corpus
    fast = preprocess(tmp_path, "fast", [path], tokenizer_path, tokenizer_backend="gigatoken")
    slow = preprocess(tmp_path, "slow", [path], tokenizer_path, tokenizer_backend="tokenizers")
    assert fast["execution"]["backend"] == "gigatoken" and slow["execution"]["backend"] == "tokenizers"
    assert dataset_bytes(fast) == dataset_bytes(slow)
    # and both are what the tokenizers library gives, document by document
    reference = Tokenizer.from_file(tokenizer_path)
    eod = reference.token_to_id("<|endoftext|>")
    got = sorted(d.tolist() for split in fast["outputs"].values() for d in IndexedDataset(split["prefix"]))
    want = sorted(reference.encode(t, add_special_tokens=False).ids + [eod] for t in texts)
    assert got == want and fast["documents"]["read"] == len(texts)


def test_auto_picks_gigatoken_and_says_why(tmp_path, tokenizer_path, corpus, capsys):
    report = preprocess(tmp_path, "auto", [corpus[0]], tokenizer_path)
    assert report["execution"]["backend"] == "gigatoken"
    err = capsys.readouterr().err
    assert "tokenizer backend: gigatoken" in err and "auto: installed and loads tokenizer.json" in err
    assert "same ids as tokenizers on" in err and "sample documents" in err


def marker_gets_one_wrong_id(real):
    """A fake gigatoken: the second id of the first text starting with MARKER is off by one."""

    def encode_flat(self, texts):
        flat, lengths = real(self, texts)
        for i, text in enumerate(texts):
            if (text if isinstance(text, str) else text.decode()).startswith("MARKER"):
                flat = flat.copy()
                flat[int(lengths[:i].sum()) + 1] += 1
                break
        return flat, lengths

    return encode_flat


@pytest.mark.parametrize("backend", ["gigatoken", "auto"])
def test_identity_check_stops_a_run_where_a_backend_disagrees(
    tmp_path, tokenizer_path, corpus, monkeypatch, capsys, backend
):
    """The run stops before writing anything, naming the document, both id sequences and the flag
    that avoids gigatoken."""
    monkeypatch.setattr(
        GigatokenTokenizer, "encode_flat", marker_gets_one_wrong_id(GigatokenTokenizer.encode_flat)
    )
    path, texts = corpus
    line = next(i for i, t in enumerate(texts) if t.startswith("MARKER")) + 1
    out = tmp_path / "stopped" / "corpus"
    args = ["--input", path, "--tokenizer", tokenizer_path, "--output-prefix", str(out), "--workers", "0"]
    assert main(args + ["--tokenizer-backend", backend, "--no-clean", "--no-dedup"]) == 2
    err = capsys.readouterr().err
    message = err.splitlines()[-1]
    assert message.startswith(
        f"preprocess_data.py: error: gigatoken and tokenizers disagree on {path}:{line} "
    )
    assert message.endswith("pass --tokenizer-backend tokenizers") and "Traceback" not in err
    ids = Tokenizer.from_file(tokenizer_path).encode(texts[line - 1], add_special_tokens=False).ids
    wrong = [ids[0], ids[1] + 1, *ids[2:]]
    assert f"tokenizers gives [{ids[0]}, {ids[1]}, {ids[2]}" in message
    assert f"gigatoken gives [{wrong[0]}, {wrong[1]}, {wrong[2]}" in message
    assert "first difference at id 1" in message
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written


def test_identity_check_message_on_the_command_line(tmp_path, tokenizer_path, corpus, monkeypatch, capsys):
    """A backend that is off everywhere fails on the probe texts already."""
    real = GigatokenTokenizer.encode_flat

    def all_wrong(self, texts):
        flat, lengths = real(self, texts)
        return flat + 1, lengths

    monkeypatch.setattr(GigatokenTokenizer, "encode_flat", all_wrong)
    out = tmp_path / "cli" / "corpus"
    args = ["--input", corpus[0], "--tokenizer", tokenizer_path, "--output-prefix", str(out), "--no-clean"]
    assert main(args + ["--tokenizer-backend", "gigatoken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: gigatoken and tokenizers disagree on one space: ")
    assert "pass --tokenizer-backend tokenizers" in err and "Traceback" not in err
    # under auto, a tokenizer gigatoken cannot reproduce on the probes is not used (and nothing stops)
    assert main(args + ["--tokenizer-backend", "auto", "--workers", "0"]) == 0
    assert "tokenizers (auto: gigatoken cannot reproduce" in capsys.readouterr().err


def test_auto_falls_back_when_gigatoken_is_missing(tmp_path, tokenizer_path, corpus, monkeypatch, capsys):
    with_it = preprocess(tmp_path, "with", [corpus[0]], tokenizer_path)
    without_gigatoken(monkeypatch)
    tok = load_tokenizer(tokenizer_path, "auto")
    assert isinstance(tok, HFTokenizer)
    assert "auto: the gigatoken package is not installed" in tok.selection and "[fast]" in tok.selection
    without = preprocess(tmp_path, "without", [corpus[0]], tokenizer_path)
    assert without["execution"]["backend"] == "tokenizers"
    assert "gigatoken package is not installed" in capsys.readouterr().err
    assert dataset_bytes(with_it) == dataset_bytes(without)


def test_asking_for_gigatoken_without_the_package_is_one_clear_error(
    tmp_path, tokenizer_path, corpus, monkeypatch, capsys
):
    without_gigatoken(monkeypatch)
    args = ["--input", corpus[0], "--tokenizer", tokenizer_path, "--output-prefix", str(tmp_path / "x")]
    assert main(args + ["--tokenizer-backend", "gigatoken"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "gigatoken package is not installed" in err and "pip install" in err
    assert "pass --tokenizer-backend tokenizers instead" in err


def lowercase_tokenizer(path):
    """A tokenizer.json the tokenizers library reads but gigatoken rejects (Lowercase normalizer)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus_texts(50), trainer=trainer)
    tok.save(str(path))
    return str(path)


def test_a_file_gigatoken_rejects(tmp_path, corpus, capsys):
    path = lowercase_tokenizer(tmp_path / "lower.json")
    tok = load_tokenizer(path, "auto")
    assert isinstance(tok, HFTokenizer) and f"auto: gigatoken cannot load {path}" in tok.selection
    with pytest.raises(
        TokenizerBackendError, match=r"gigatoken cannot load .*lower\.json.*--tokenizer-backend tokenizers"
    ):
        load_tokenizer(path, "gigatoken")
    args = ["--input", corpus[0], "--tokenizer", path, "--output-prefix", str(tmp_path / "o"), "--no-clean"]
    assert main(args + ["--tokenizer-backend", "gigatoken"]) == 2
    err = capsys.readouterr().err
    assert "lower.json" in err and "Lowercase" in err and "--tokenizer-backend tokenizers" in err
    assert main(args + ["--tokenizer-backend", "auto", "--workers", "0"]) == 0  # falls back


def sentencepiece_model(tmp_path, model_type, **kw):
    import sentencepiece as spm

    text = tmp_path / f"{model_type}.txt"
    text.write_text("\n".join(corpus_texts(300)), encoding="utf-8")
    prefix = tmp_path / model_type
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=300, model_type=model_type, minloglevel=2,
        num_threads=1, hard_vocab_limit=False, **kw,
    )  # fmt: skip
    return str(prefix) + ".model"


@pytest.mark.parametrize(
    "model_type, extra, reason",
    [
        ("unigram", {}, "gigatoken cannot load"),
        ("bpe", {"byte_fallback": True}, "gigatoken cannot reproduce"),
    ],
)
def test_auto_falls_back_for_sentencepiece_models(tmp_path, corpus, model_type, extra, reason):
    model = sentencepiece_model(tmp_path, model_type, **extra)
    tok = load_tokenizer(model, "auto")
    assert isinstance(tok, SentencePieceTokenizer) and f"sentencepiece (auto: {reason}" in tok.selection
    report = preprocess(tmp_path, "sp", [corpus[0]], model, split=None)
    assert report["execution"]["backend"] == "sentencepiece"
    ds = IndexedDataset(report["outputs"]["all/text"]["prefix"])
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod_id] for t in corpus[1]]
    with pytest.raises(TokenizerBackendError, match="--tokenizer-backend sentencepiece"):
        load_tokenizer(model, "gigatoken")
    with pytest.raises(TokenizerBackendError, match=r"cannot read .*\(a SentencePiece model\)"):
        load_tokenizer(model, "tokenizers")


def test_outputs_identical_for_any_workers(tmp_path, tokenizer_path, corpus):
    reports = [
        preprocess(tmp_path, f"w{workers}", [corpus[0]], tokenizer_path, workers=workers, exact_dedup=True)
        for workers in (0, 1, 2)
    ]
    assert [r["execution"]["backend"] for r in reports] == ["gigatoken"] * 3
    assert [r["execution"]["processes"] for r in reports] == [0, 1, 2]
    first = dataset_bytes(reports[0])
    assert all(dataset_bytes(r) == first for r in reports[1:])


def test_default_plan_for_2_and_64_cores(tokenizer_path):
    """The defaults README/preprocess documents: gigatoken without cleaning runs in the main process
    on every core; cleaning or dedup (Python per document) take one single-threaded process per core."""
    plain = PreprocessConfig(inputs=("x",), output_prefix="o/x", tokenizer=tokenizer_path, cleaning=None,
                             exact_dedup=False, minhash=None)  # fmt: skip
    cleaned = PreprocessConfig(inputs=("x",), output_prefix="o/x", tokenizer=tokenizer_path)
    for cores, prepare in ((2, 1), (64, 4)):
        fast = plan_execution(plain, "gigatoken", cores)
        assert (fast.processes, fast.threads, fast.prepare_threads) == (0, cores, prepare)
        assert fast.chunk_bytes == 4 << 20
        slow = plan_execution(cleaned, "gigatoken", cores)
        assert (slow.processes, slow.threads, slow.chunk_bytes) == (cores, 1, 1 << 20)
        assert plan_execution(plain, "tokenizers", cores).processes == cores
    assert plan_execution(plain, "gigatoken", 1).processes == 0
    assert plan_execution(dataclasses.replace(plain, workers=3), "gigatoken", 64).threads == 21


def test_probe_texts_put_every_special_token_inside_text(tokenizer_path):
    reference = load_tokenizer(tokenizer_path)
    probes = dict(probe_texts(reference.special_strings()))
    assert probes["empty text"] == "" and "special token '<|padding|>' inside a word" in probes
    fast = load_tokenizer(tokenizer_path, "gigatoken")
    texts = list(probes.values())
    flat, lengths = fast.encode_flat([t.encode() for t in texts])
    assert np.array_equal(np.repeat(np.arange(len(texts)), lengths).size, flat.size)
    assert flat.tolist() == [i for ids in reference.encode_batch(texts) for i in ids]
    assert fast.eod_id == reference.eod_id and fast.vocab_size == reference.vocab_size
    assert fast.decode(fast.encode("café 🎉")) == "café 🎉"


def test_only_text_of_unknown_origin_is_scanned_for_the_separator(tokenizer_path):
    """The scanner's columns are valid UTF-8 by construction, so encode_flat trusts them; bytes from
    elsewhere are checked, and a 0xFF inside one text still gives one id sequence per text."""
    from megatron_andromeda.preprocess.fast import decode_columns_utf8
    from megatron_andromeda.preprocess.readers import RawChunk

    lines = [json.dumps({"text": t}).encode() + b"\n" for t in ["café 🎉", "", "plain"]]
    column = decode_columns_utf8(RawChunk(0, 1, lines=lines), ["text"]).columns[0]
    assert column.valid_utf8
    fast = load_tokenizer(tokenizer_path, "gigatoken")
    reference = load_tokenizer(tokenizer_path, "tokenizers")
    flat, lengths = fast.encode_flat(column)
    assert flat.tolist() == [i for ids in reference.encode_batch(["café 🎉", "", "plain"]) for i in ids]
    texts = [b"left", b"in\xffside", b"right"]
    flat, lengths = fast.encode_flat(texts)
    assert lengths.size == 3 and lengths[1] > 0
    assert flat[: lengths[0]].tolist() == reference.encode("left")
    assert flat[lengths[:2].sum() :].tolist() == reference.encode("right")


def test_config_field_names_the_backend():
    assert TOKENIZER_BACKEND_CHOICES == TOKENIZER_BACKENDS
    DataConfig(tokenizer_backend="gigatoken").validate()
    with pytest.raises(ConfigError, match="data.tokenizer_backend='fast'.*auto, gigatoken, tokenizers"):
        DataConfig(tokenizer_backend="fast").validate()


def test_config_setting_in_messages(tokenizer_path, monkeypatch):
    without_gigatoken(monkeypatch)
    with pytest.raises(TokenizerBackendError, match="set data.tokenizer_backend=tokenizers instead"):
        load_tokenizer(tokenizer_path, "gigatoken", setting="data.tokenizer_backend")


def test_prepare_threads_keep_input_order(tmp_path, tokenizer_path, corpus, monkeypatch):
    """On many cores several threads read and decode ahead of gigatoken; the output is the same."""
    one = preprocess(tmp_path, "one", [corpus[0]], tokenizer_path, workers=None, chunk_bytes=300)
    monkeypatch.setattr(pipeline, "_available_cores", lambda: 24)
    plain = PreprocessConfig(inputs=("x",), output_prefix="o/x", tokenizer=tokenizer_path, cleaning=None,
                             exact_dedup=False, minhash=None)  # fmt: skip
    plan = plan_execution(plain, "gigatoken", 24)
    assert (plan.processes, plan.prepare_threads) == (0, 3)
    many = preprocess(tmp_path, "many", [corpus[0]], tokenizer_path, workers=None, chunk_bytes=300)
    assert many["execution"]["threads"] == 24 and one["execution"]["processes"] == 0
    assert dataset_bytes(one) == dataset_bytes(many)


def test_training_loads_the_tokenizer_with_the_configured_backend(tokenizer_path, monkeypatch):
    from megatron_andromeda import train
    from megatron_andromeda.config import load_config

    overrides = [f"data.tokenizer={tokenizer_path}", "model.vocab_size=512"]
    assert isinstance(train._load_tokenizer(load_config(None, overrides)), GigatokenTokenizer)  # auto
    pinned = load_config(None, [*overrides, "data.tokenizer_backend=tokenizers"])
    assert isinstance(train._load_tokenizer(pinned), HFTokenizer)
    without_gigatoken(monkeypatch)
    asked = load_config(None, [*overrides, "data.tokenizer_backend=gigatoken"])
    with pytest.raises(TokenizerBackendError, match="set data.tokenizer_backend=tokenizers instead"):
        train._load_tokenizer(asked)
