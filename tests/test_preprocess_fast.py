"""The C++ hot loops of preprocessing (csrc/preprocess_fast.cpp) against their Python definitions."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_andromeda.preprocess.cleaning import CleaningConfig, _ngram_rules, ngram_rules_reference
from megatron_andromeda.preprocess.fast import decode_columns_utf8, with_eod, with_eod_reference
from megatron_andromeda.preprocess.readers import RawChunk, decode_chunk
from megatron_andromeda.preprocess.words import split_words, split_words_reference

KEYS = [("text",), ("text", "meta")]


def reference(lines, keys):
    """readers.decode_chunk with json.loads, texts as UTF-8 (lone surrogates never get this far)."""
    out = decode_chunk(RawChunk(3, 7, lines=list(lines)), keys, json.loads)
    return [tuple(t.encode("utf-8") for t in texts) for texts in out.texts], out.lines, out.malformed


def fast(lines, keys):
    out = decode_columns_utf8(RawChunk(3, 7, lines=list(lines)), keys)
    return list(zip(*(column.to_list() for column in out.columns))), out.lines, out.malformed


EDGE_LINES = [
    b'{"text": "plain"}\n',
    b'{"text": "a\\ud83d\\ude00b", "x": [1, 2.5e3, -0.0, {"text": 5}], "text": "last wins"}\n',
    b'{"text": "lone \\ud800 surrogate"}\n',
    b'{"text": "lone low \\udc00"}\n',
    b'{"text": "high then not low \\ud800\\u0041"}\n',
    b'{"text": NaN}\n',
    b'{"text": "x", "n": Infinity}\n',
    b'{"text": "x", "n": -Infinity}\n',
    b"[1, 2]\n",
    b'"just a string"\n',
    b"\n",
    b"  \t \r\n",
    b"\x0c\n",
    b'{"text": "a", "text": 1}\n',
    b'{"text": 1, "text": "b"}\n',
    b'{"te\\u0078t": "escaped key", "meta": "m"}\n',
    b'{"text": "esc \\n\\t\\"\\\\\\/ \\b\\f\\r \\u00e9 \\u20AC", "meta": ""}\n',
    b'\xef\xbb\xbf{"text": "bom"}\n',
    b'{"text": "bad \xff byte"}\n',
    b'{"text": "overlong \xc0\xaf"}\n',
    b'{"text": "encoded surrogate \xed\xa0\x80"}\n',
    b'{"text": "past max \xf4\x90\x80\x80"}\n',
    b'{"text": "truncated \xe2\x82"}\n',
    b'{"text": "ok"} trailing\n',
    b'{"text": "raw control \x01"}\n',
    b'{"text": "raw tab \t"}\n',
    b'{"text": "' + b"1" * 10 + b'", "n": ' + b"9" * 5000 + b"}\n",
    b'{"text": "x", "n": 1e999}\n',
    b'{"text": "x", }\n',
    b'{"text": "x" "meta": "y"}\n',
    b'{"text": "x", "n": 01}\n',
    b'{"text": "x", "n": 1.}\n',
    b'{"text": "x", "n": .5}\n',
    b'{"text": "x", "n": [' + b"[" * 200 + b"]" * 200 + b"]}\n",
    b'{"text": "x", "n": true, "m": false, "k": null, "meta": "\xe6\x97\xa5\xf0\x9f\x8e\x89"}\r\n',
    b'{"text": "unterminated',
    b'{"text": "\\x41"}\n',
    b'{"text": "\\u12"}\n',
    b'{"meta": "only meta"}\n',
    b'{"text": ["not", "a string"]}\n',
    b"{}\n",
    b'{"text": "\x00"}\n',
    b'{"text": "\\u0000 nul"}\n',
    b'  {"text": "spaces around"}  \n',
]


@pytest.mark.parametrize("keys", KEYS)
def test_edge_lines_decode_as_json_loads_does(keys):
    assert fast(EDGE_LINES, keys) == reference(EDGE_LINES, keys)
    for line in EDGE_LINES:  # one at a time too: a line's outcome never depends on its neighbours
        assert fast([line], keys) == reference([line], keys)


texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
# Mostly well-formed records (the scanner's path), with extra members, duplicate-prone names and
# arbitrary values around them.
documents = st.builds(
    lambda base, extra, order: dict(sorted({**extra, **base}.items(), reverse=order)),
    st.fixed_dictionaries({"text": texts}, optional={"meta": texts | values}),
    st.dictionaries(st.sampled_from(["other", "Text", "te\u0078t", "meta"]) | texts, values, max_size=3),
    st.booleans(),
)


@st.composite
def jsonl_lines(draw):
    line = json.dumps(draw(documents), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    mutation = draw(st.sampled_from(["none", "none", "insert", "delete", "replace", "truncate", "raw"]))
    at = draw(st.integers(0, len(line)))
    if mutation == "insert":
        line = line[:at] + draw(st.binary(min_size=1, max_size=3)) + line[at:]
    elif mutation == "delete":
        line = line[:at] + line[at + 1 :]
    elif mutation == "replace" and at < len(line):
        line = line[:at] + draw(st.binary(min_size=1, max_size=1)) + line[at + 1 :]
    elif mutation == "truncate":
        line = line[:at]
    elif mutation == "raw":
        line = draw(st.binary(max_size=30))
    return line + draw(st.sampled_from([b"\n", b"\r\n", b""]))


@settings(max_examples=150, deadline=None)
@given(st.lists(jsonl_lines(), min_size=1, max_size=6), st.sampled_from(KEYS))
def test_random_and_mutated_lines_decode_as_json_loads_does(lines, keys):
    assert fast(lines, keys) == reference(lines, keys)


def test_columnar_chunks_come_back_as_utf8():
    chunk = RawChunk(0, 1, columns={"text": ["é", b"raw", 5]}, num_rows=3)
    out = decode_columns_utf8(chunk, ("text",))
    assert out.columns[0].to_list() == ["é".encode(), b"raw"] and out.malformed == [("non_string", 3)]
    assert out.records() == [("é",), ("raw",)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 7), max_size=12),
    st.sampled_from([np.uint32, np.int64]),
    st.sampled_from(["uint16", "int32"]),
)
def test_eod_insertion_matches_numpy(lengths, source, target):
    lengths = np.asarray(lengths, dtype=np.int64)
    flat = np.random.default_rng(len(lengths)).integers(0, 60000, size=int(lengths.sum())).astype(source)
    got, sizes = with_eod(flat, lengths, 65535 if target == "uint16" else 70000, np.dtype(target))
    want, want_sizes = with_eod_reference(
        flat, lengths, 65535 if target == "uint16" else 70000, np.dtype(target)
    )
    assert got.dtype == want.dtype == np.dtype(target)
    assert np.array_equal(got, want) and np.array_equal(sizes, want_sizes)
    plain, same = with_eod(flat, lengths, None, np.dtype(target))
    assert plain.dtype == np.dtype(target) and np.array_equal(plain, flat) and same is lengths


words_text = st.text(alphabet=st.sampled_from(list("ab AB\t\n\r\x00\x1f.#é日🎉\u00a0")), max_size=200)


@settings(max_examples=200, deadline=None)
@given(words_text, st.booleans())
def test_split_words_matches_numpy(text, claim_ascii):
    data = text.encode("utf-8")
    ascii_only = claim_ascii and data.isascii()  # the flag is a promise: only made when true
    got, want = split_words(data, ascii_only), split_words_reference(data, ascii_only)
    assert np.array_equal(got.hashes, want.hashes) and got.hashes.dtype == np.uint64
    assert np.array_equal(got.chars, want.chars) and got.chars.dtype == np.int64
    assert np.array_equal(got.has_alpha, want.has_alpha) and got.has_alpha.dtype == np.bool_


# Few distinct words so n-grams repeat and every rule gets exercised.
repetitive = st.lists(
    st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "x", "longerword"]), max_size=120
)
limits = st.dictionaries(st.integers(1, 12), st.floats(0.0, 1.0), max_size=6)


@settings(max_examples=300, deadline=None)
@given(repetitive, limits, limits)
def test_ngram_rules_match_numpy(words, top, duplicate):
    config = CleaningConfig(max_top_ngram_chars_ratio=top, max_duplicate_ngram_chars_ratio=duplicate)
    split = split_words(" ".join(words).encode())
    assert _ngram_rules(split, config) == ngram_rules_reference(split, config)


def test_ngram_rules_match_numpy_on_default_limits():
    config = CleaningConfig()
    rng = np.random.default_rng(0)
    unique = [f"w{i}x" for i in range(2000)]
    phrase = unique[1500:1510]
    texts = {
        "no words": [],
        "unique words": unique[:300],
        "a repeated phrase": unique[:40] + phrase + unique[40:80] + phrase,
        "a phrase repeated often": (unique[:5] * 12) + unique[100:120],
        "random words of four": list(rng.choice(unique[:4], size=200)),
        "one pair of words throughout": unique[:2] * 60 + unique[200:260],
    }
    reasons = {}
    for name, words in texts.items():
        split = split_words(" ".join(words).encode())
        reasons[name] = _ngram_rules(split, config)
        assert reasons[name] == ngram_rules_reference(split, config), name
    assert reasons["unique words"] is None and reasons["no words"] is None
    assert reasons["a repeated phrase"].startswith("duplicate_")
    assert reasons["one pair of words throughout"] == "top_2gram"
