"""Text normalisation, each quality rule, the config, and the vectorised word statistics."""

import random
import unicodedata

import numpy as np
import pytest

from megatron_andromeda.preprocess.cleaning import CleaningConfig, clean_text, quality_reason
from megatron_andromeda.preprocess.words import covered_words, duplicate_mask, split_words, top_count

_rng = random.Random(0)
_VOCAB = [
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 8))) for _ in range(2000)
]


def prose(words=300, seed=1):
    """Varied, clean English-like text: passes every default rule."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        n = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(_VOCAB) for _ in range(n)).capitalize() + ".")
        count += n
    lines = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    return "\n".join(lines)


def test_clean_text_normalises_unicode_and_strips_controls():
    decomposed = "cafe\u0301 \x00bell\x07 zero\ufeffwidth tab\tnew\nline \x85c1"
    out = clean_text(decomposed, CleaningConfig())
    assert out == "caf\u00e9 bell zerowidth tab\tnew\nline c1"
    assert unicodedata.is_normalized("NFC", out)
    untouched = clean_text(decomposed, CleaningConfig(unicode_form=None, strip_control_chars=False))
    assert untouched == decomposed


def test_good_prose_passes_every_default_rule():
    assert quality_reason(prose(), CleaningConfig()) is None


@pytest.mark.parametrize("text,reason", [
    ("only a few words here.", "too_few_words"),
    (" ".join(["a"] * 60 + ["of"] * 60), "mean_word_length"),
    (" ".join(w * 3 for w in _VOCAB[:80]), "mean_word_length"),
    (prose(100) + " 1234 5678 99 ==== |||| +++ ---" * 20, "alpha_words"),
    (prose(100) + " #tag" * 20, "symbol_ratio"),
    (prose(100) + " and..." * 20, "symbol_ratio"),
    ("\n".join("- " + " ".join(_VOCAB[i * 7 : i * 7 + 7]) for i in range(20)), "bullet_lines"),
    ("\n".join(" ".join(_VOCAB[i * 7 : i * 7 + 7]) + "..." for i in range(10)) + "\n" + prose(60),
     "ellipsis_lines"),
    (prose(120) + "\n" + "\n".join(["click here to subscribe now"] * 40), "duplicate_lines"),
    (prose(200) + "\n" + "\n".join([" ".join(_VOCAB[:60])] * 3), "duplicate_line_chars"),
    (prose(400) + ("\n\nthe same paragraph again and again") * 3, "duplicate_paragraphs"),
    (prose(60) + " lorem ipsum dolor sit amet", "lorem_ipsum"),
    (prose(200) + " " + " ".join(["buy cheap"] * 60), "top_2gram"),
    (prose(200) + " " + " ".join(_VOCAB[100:130]) + " " + " ".join(_VOCAB[100:130]), "duplicate_5gram"),
])  # fmt: skip
def test_each_rule_fires(text, reason):
    assert quality_reason(text, CleaningConfig()) == reason


def test_length_bounds_and_switching_rules_off():
    text = prose(300)
    assert quality_reason(text, CleaningConfig(min_chars=len(text) + 1)) == "too_short"
    assert quality_reason(text, CleaningConfig(max_chars=len(text) - 1)) == "too_long"
    assert quality_reason(text, CleaningConfig(min_words=None, max_words=10)) == "too_many_words"
    short = "only a few words here."
    assert quality_reason(short, CleaningConfig(min_words=None, min_mean_word_length=None)) is None
    repeated = prose(100) + " " + " ".join(["buy cheap"] * 60)
    off = CleaningConfig(
        max_top_ngram_chars_ratio={},
        max_duplicate_ngram_chars_ratio={},
        max_duplicate_lines_ratio=None,
        max_duplicate_paragraph_chars_ratio=None,
    )
    assert quality_reason(repeated, off) is None


def test_config_overrides_and_validation():
    config = CleaningConfig().with_overrides(
        {"min_words": "10", "min_alpha_words_ratio": "none", "max_top_ngram_chars_ratio": "2:0.5",
         "drop_lorem_ipsum": "false", "unicode_form": "NFKC"}
    )  # fmt: skip
    assert config.min_words == 10 and config.min_alpha_words_ratio is None
    assert config.max_top_ngram_chars_ratio == {2: 0.5} and config.drop_lorem_ipsum is False
    assert config.unicode_form == "NFKC"
    with pytest.raises(ValueError, match="unknown cleaning option"):
        CleaningConfig().with_overrides({"min_word": "3"})
    with pytest.raises(ValueError, match="min_words=abc"):
        CleaningConfig().with_overrides({"min_words": "abc"})
    with pytest.raises(ValueError, match="min_words=20 is larger than max_words=10"):
        CleaningConfig(min_words=20, max_words=10)
    with pytest.raises(ValueError, match=r"must be a fraction"):
        CleaningConfig(max_duplicate_lines_ratio=1.5)
    with pytest.raises(ValueError, match="unicode_form"):
        CleaningConfig(unicode_form="NFX")


def test_split_words_matches_python_split():
    text = "Hello,  world!\tHELLO world\n\nnaïve café 東京 x2 ...  "
    words = split_words(text.encode(), ascii_only=False)
    reference = text.split()
    assert len(words) == len(reference)
    assert words.chars.tolist() == [len(w) for w in reference]
    assert words.has_alpha.tolist() == [any(c.isalpha() for c in w) for w in reference]
    h = words.hashes.tolist()
    assert h[0] != h[2] and h[1] != h[3]  # "Hello," vs "HELLO", "world!" vs "world": punctuation counts
    assert len(split_words(b"")) == 0 and len(split_words(b" \n\t ")) == 0


def test_word_hashes_fold_case_and_distinguish_words():
    words = split_words(b"Apple apple APPLE apples appel elppa pa ap")
    h = words.hashes.tolist()
    assert h[0] == h[1] == h[2]
    assert len(set(h[2:])) == 6  # apple, apples, appel, elppa, pa, ap all differ


def test_ngram_statistics():
    words = split_words(b"a b c d a b c d e f")
    bigrams = words.ngram_hashes(2)  # ab bc cd da ab bc cd de ef
    assert bigrams.size == 9
    assert duplicate_mask(bigrams).tolist() == [True, True, True, False, True, True, True, False, False]
    assert top_count(bigrams)[0] == 2
    covered = covered_words(duplicate_mask(words.ngram_hashes(4)), 4, len(words))
    assert covered.tolist() == [True] * 8 + [False, False]  # "a b c d" twice
    assert words.ngram_hashes(11).size == 0
    many = split_words(" ".join(str(i) for i in range(5000)).encode())
    assert not duplicate_mask(many.ngram_hashes(3)).any()  # no false duplicates among distinct 3-grams
    assert np.unique(many.hashes).size == 5000
