"""The shipped demo corpus, the script that builds it, and tools/train_tokenizer.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from tool_loader import load_tool

from megatron_andromeda.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "data" / "corpus" / "austen.jsonl.gz"
README = CORPUS.parent / "README.md"


train_tokenizer = load_tool("train_tokenizer")
build_corpus = load_tool("build_embedded_corpus")


def _read_corpus() -> list[dict]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory) -> tuple[Path, list[str]]:
    """A slice of the shipped corpus from several novels (fast to train on)."""
    records = _read_corpus()
    picked = records[:25] + records[-25:]
    path = tmp_path_factory.mktemp("slice") / "slice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    return path, [r["text"] for r in picked]


# ------------------------------------------------------------------ the shipped corpus


def test_shipped_corpus_loads_and_is_clean_prose():
    records = _read_corpus()
    assert len(records) >= 500
    assert all(set(r) == {"text", "source"} and r["text"].strip() for r in records)
    assert len({r["source"] for r in records}) == len(records)
    text_bytes = sum(len(r["text"].encode()) for r in records)
    assert 3_000_000 < text_bytes < 8_000_000
    joined = "\n".join(r["text"] for r in records)
    assert "It is a truth universally acknowledged" in joined
    for leftover in ("_", "CHAPTER", "Project Gutenberg", "* * *", "NOTE ON THE TEXT"):
        assert leftover not in joined, leftover


def test_corpus_readme_states_source_licence_and_checksum():
    readme = README.read_text(encoding="utf-8")
    assert "public domain" in readme.lower() and "MIT" in readme
    assert "r-cran-janeaustenr" in readme
    digest = hashlib.sha256(CORPUS.read_bytes()).hexdigest()
    assert digest in readme, "README sha256 is stale: rebuild notes with tools/build_embedded_corpus.py"
    assert f"{len(_read_corpus()):,} " in readme or f"| {len(_read_corpus())} " in readme


# ------------------------------------------------------------------ byte-level BPE


def test_bpe_special_ids_round_trip_and_loader(corpus_slice, tmp_path):
    path, texts = corpus_slice
    out = tmp_path / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(path), "--output", str(out), "--vocab-size", "512"]) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 512
    assert (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|padding|>")) == (0, 1)
    assert (tok.eod_id, tok.pad_id) == (0, 1)
    for text in texts[:10] + ["  two spaces, £20, naïve café\n\n\ttab ✓ 日本"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Learned merges actually compress English: far fewer tokens than bytes.
    assert len(tok.encode(texts[0])) < 0.5 * len(texts[0].encode())


def test_bpe_training_is_deterministic(corpus_slice, tmp_path):
    path, _ = corpus_slice
    outs = [tmp_path / f"t{i}.json" for i in range(2)]
    for out in outs:
        train_tokenizer.train([path], out, vocab_size=512)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_text_and_gzip_inputs(corpus_slice, tmp_path):
    _, texts = corpus_slice
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(texts[:5]), encoding="utf-8")
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": texts[5]}) + "\n")
    assert list(train_tokenizer.iter_texts([gz], json_key="body")) == [texts[5]]
    vocab = train_tokenizer.train([txt, gz], tmp_path / "tok.json", vocab_size=300, json_key="body")
    assert vocab == 300


# ------------------------------------------------------------------ SentencePiece


def test_sentencepiece_kind(corpus_slice, tmp_path):
    path, texts = corpus_slice
    out = tmp_path / "sp.model"
    args = ["--kind", "sentencepiece", "--input", str(path), "--output", str(out), "--vocab-size", "512"]
    assert train_tokenizer.main(args) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 512
    assert tok.token_to_id("</s>") == tok.eod_id == 2
    for text in texts[:5]:
        assert tok.decode(tok.encode(text)) == text
    first = out.read_bytes()
    train_tokenizer.main(args)
    assert out.read_bytes() == first


# ------------------------------------------------------------------ bad input


def test_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert train_tokenizer.main(["--input", str(missing), "--output", str(tmp_path / "t.json")]) == 2
    assert f"--input {missing}: file not found" in capsys.readouterr().err

    odd = tmp_path / "data.parquet"
    odd.write_bytes(b"x")
    assert train_tokenizer.main(["--input", str(odd), "--output", str(tmp_path / "t.json")]) == 2
    assert "unknown format" in capsys.readouterr().err

    bad_key = tmp_path / "k.jsonl"
    bad_key.write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    with pytest.raises(train_tokenizer.InputError, match=r"k\.jsonl:2: no string field 'text'"):
        train_tokenizer.train([bad_key], tmp_path / "t.json", vocab_size=300)
    bad_key.write_text('{"text": "fine"}\n')

    with pytest.raises(ValueError, match=r"must end in \.model"):
        train_tokenizer.train([bad_key], tmp_path / "t.json", vocab_size=300, kind="sentencepiece")
    with pytest.raises(ValueError, match="--vocab-size 100"):
        train_tokenizer.train([bad_key], tmp_path / "t.json", vocab_size=100)
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        train_tokenizer.train([bad_key], tmp_path / "t.model", vocab_size=4096, kind="sentencepiece")
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.model").exists()


# ------------------------------------------------------------------ the corpus builder


def _xdr(kind: int, items, names: list[str] | None = None) -> bytes:
    """Serialize a tiny R object (STRSXP 16, INTSXP 13, LGLSXP 10, VECSXP 19) in XDR format."""
    flags = kind | (1 << 9 if names else 0)
    body = struct.pack(">ii", flags, len(items))
    for item in items:
        if kind == 16:
            raw = item.encode()
            body += struct.pack(">ii", 0x00040009, len(raw)) + raw
        elif kind in (10, 13):
            body += struct.pack(">i", item)
        else:
            body += item
    if names:  # attributes pairlist: names = STRSXP, tag is the symbol "names"
        sym = struct.pack(">ii", 1, 0x00040009) + struct.pack(">i", 5) + b"names"
        body += struct.pack(">i", 2 | 1 << 10) + sym + _xdr(16, names) + struct.pack(">i", 254)
    return body


def _serialized(obj: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + obj


def _fake_janeaustenr(root: Path) -> None:
    """A package tree with the six novels as tiny R character vectors in a lazy-load database."""
    rdb, offsets = b"", []
    for i, var in enumerate(build_corpus.NOVELS):
        lines = [var.upper(), "", "By Jane Austen", "", "CHAPTER I", "", "It was _very_ odd,", "said she."]
        lines += ["", f"Second paragraph of book {i}.", "", "          * * * * *", "", "CHAPTER II", ""]
        lines += ["    A verse line,", "      and its answer.", "", "Final words.", "", "THE END"]
        blob = zlib.compress(_serialized(_xdr(16, lines)))
        entry = struct.pack(">i", len(blob)) + blob
        offsets.append(_xdr(13, [len(rdb), len(entry)]))
        rdb += entry
    variables = _xdr(19, offsets, names=list(build_corpus.NOVELS))
    index = _xdr(
        19, [variables, _xdr(19, []), _xdr(10, [1])], names=["variables", "references", "compressed"]
    )
    data = root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    data.mkdir(parents=True)
    (data / "Rdata.rdb").write_bytes(rdb)
    (data / "Rdata.rdx").write_bytes(gzip.compress(_serialized(index), mtime=0))


def test_builder_end_to_end_on_fake_package(tmp_path, capsys):
    _fake_janeaustenr(tmp_path / "pkg")
    outs = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"]
    for out in outs:
        assert build_corpus.main([str(tmp_path / "pkg"), "--output", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert "12 documents" in capsys.readouterr().out
    with gzip.open(outs[0], "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records[0] == {
        "text": "It was very odd, said she.\n\nSecond paragraph of book 0.",
        "source": "austen/sense_and_sensibility/ch01/part1",
    }
    assert records[1]["text"] == "A verse line,\nand its answer.\n\nFinal words."
    assert records[-1]["source"] == "austen/persuasion/ch02/part1"


def test_builder_rejects_wrong_source_dir(tmp_path):
    with pytest.raises(SystemExit, match="no data/Rdata.rdx"):
        build_corpus.main([str(tmp_path)])
    bad = tmp_path / "x" / "data"
    bad.mkdir(parents=True)
    (bad / "Rdata.rdx").write_bytes(gzip.compress(b"RDX3\nnot xdr"))
    with pytest.raises(SystemExit, match="not an XDR-format"):
        build_corpus.main([str(tmp_path / "x"), "--output", str(tmp_path / "o.jsonl.gz")])


def test_chunking_keeps_paragraphs_whole():
    paras = ["a" * 300, "b" * 300, "c" * 900, "d" * 50]
    docs = build_corpus.chunk_paragraphs(paras, max_chars=700)
    assert docs == ["a" * 300 + "\n\n" + "b" * 300, "c" * 900, "d" * 50]
    assert re.sub(r"\n\n", "", "".join(docs)) == "".join(paras)
