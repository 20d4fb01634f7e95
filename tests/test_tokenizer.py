"""load_tokenizer over Hugging Face tokenizer.json and SentencePiece .model files."""

import hashlib

import pytest
from tiny_tokenizer import train_tiny_tokenizer

from megatron_andromeda.data.tokenizer import load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"] * 20


def _hf_tokenizer(path, special_tokens=("<|endoftext|>", "<|padding|>")):
    from tokenizers import Tokenizer

    train_tiny_tokenizer(path, TEXTS, vocab_size=320, special_tokens=special_tokens)
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens(["<|extra|>"])  # an added token counts in vocab_size
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = _hf_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    ids = tok.encode(TEXTS[0])
    assert tok.decode(ids) == TEXTS[0]
    assert tok.eod_id not in ids  # no special tokens added
    assert tok.eod_id == tok.token_to_id("<|endoftext|>") and tok.pad_id == tok.token_to_id("<|padding|>")
    assert tok.vocab_size == tok.token_to_id("<|extra|>") + 1
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]
    with open(path, "rb") as f:
        assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert load_tokenizer(tmp_path).path == path  # a directory means its tokenizer.json


def test_missing_eod_token_is_an_error(tmp_path):
    tok = load_tokenizer(_hf_tokenizer(tmp_path / "t.json", special_tokens=("<unk>",)))
    assert tok.pad_id is None
    with pytest.raises(ValueError, match=r"t\.json: no end-of-document token.*train_tokenizer"):
        _ = tok.eod_id


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 5))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40, pad_id=3, minloglevel=2
    )
    tok = load_tokenizer(tmp_path / "sp.model")
    ids = tok.encode(TEXTS[1])
    assert tok.decode(ids) == TEXTS[1]
    assert (tok.eod_id, tok.pad_id, tok.vocab_size) == (2, 3, 40)  # SentencePiece's </s> and <pad>
    assert tok.encode_batch(TEXTS[:2]) == [tok.encode(t) for t in TEXTS[:2]]


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.json.*tools/train_tokenizer\.py"):
        load_tokenizer(tmp_path / "absent.json")
