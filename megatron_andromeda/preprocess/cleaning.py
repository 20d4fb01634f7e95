"""Text normalisation and document quality rules, each switchable, in profiles per kind of text.

`clean_text` repairs what can be repaired (Unicode normal form, control characters); `quality_reason`
then returns the name of the first rule a document breaks, or None. Rules run cheapest first and stop
at the first failure, so bad documents cost little. Every threshold can be set to None to switch its
rule off.

Profiles (`--clean-profile`, and `clean_profile:` per source in the stage recipes):

- `prose` (the default): Rae et al. 2021 (Gopher, appendix A.1.1) and C4's rules; word-level rules
  use ASCII whitespace-separated words (`words.py`). They judge natural language: on source code
  they drop ordinary files (repeated n-grams, '#' comments, short "words").
- `code`: the file-level filters of code corpora (The Stack / StarCoder): a longest line above 1,000
  characters or a mean line above 100 (minified or generated files), less than 25% alphanumeric
  characters (data blobs), files above 1 MB; the text is kept byte for byte (no Unicode
  normalisation, control characters kept).
- `none`: nothing is normalised or dropped for quality (exact and near dedup still apply).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat

from megatron_andromeda.preprocess.words import (
    WORD_HASHER,
    Words,
    covered_words,
    duplicate_mask,
    split_words,
    top_count,
)

# C0 controls but tab/newline/carriage return, DEL, C1 controls; also the BOM/zero-width no-break space.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_BULLETS = ("-", "*", "\u2022", "\u25cf", "\u25e6", "\u2023", "\u2043", "\u25aa", "\u2219", "\u00b7")
_ELLIPSES = ("...", "\u2026")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


@dataclass(frozen=True)
class CleaningConfig:
    """Normalisation switches and quality thresholds; a threshold of None switches its rule off."""

    unicode_form: str | None = "NFC"
    strip_control_chars: bool = True
    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' or ellipses per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    max_duplicate_lines_ratio: float | None = 0.3
    max_duplicate_line_chars_ratio: float | None = 0.2
    max_duplicate_paragraphs_ratio: float | None = 0.3
    max_duplicate_paragraph_chars_ratio: float | None = 0.2
    # n -> highest allowed fraction of characters in the most frequent word n-gram
    max_top_ngram_chars_ratio: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # n -> highest allowed fraction of characters inside word n-grams that occur more than once
    max_duplicate_ngram_chars_ratio: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    drop_lorem_ipsum: bool = True  # C4
    # Code-corpus rules (the `code` profile): longest line, mean line length, alphanumeric share.
    max_line_length: int | None = None
    max_mean_line_length: float | None = None
    min_alnum_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.unicode_form is not None and self.unicode_form not in UNICODE_FORMS:
            raise ValueError(
                f"cleaning unicode_form {self.unicode_form!r}: use one of {UNICODE_FORMS} or None"
            )
        for low, high in (("min_chars", "max_chars"), ("min_words", "max_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            if (lo is not None and lo < 0) or (hi is not None and hi < 0):
                raise ValueError(f"cleaning {low}/{high} must be non-negative, got {lo}/{hi}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"cleaning {low}={lo} is larger than {high}={hi}")
        ratios = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.endswith("_ratio") and not isinstance(getattr(self, f.name), dict)
        }
        ratios.update({f"top {n}-gram": v for n, v in self.max_top_ngram_chars_ratio.items()})
        ratios.update({f"duplicate {n}-gram": v for n, v in self.max_duplicate_ngram_chars_ratio.items()})
        for name, value in ratios.items():
            if value is not None and not 0.0 <= value <= (1.0 if "symbol" not in name else float("inf")):
                raise ValueError(f"cleaning {name}={value} must be a fraction in [0, 1]")
        if any(n < 1 for n in [*self.max_top_ngram_chars_ratio, *self.max_duplicate_ngram_chars_ratio]):
            raise ValueError("cleaning n-gram sizes must be >= 1")

    def with_overrides(self, overrides: dict[str, str]) -> CleaningConfig:
        """A copy with fields set from strings (CLI `--clean-set NAME=VALUE`); 'none' switches a rule off."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, object] = {}
        for name, raw in overrides.items():
            if name not in fields:
                raise ValueError(
                    f"--clean-set {name}: unknown cleaning option; known: {', '.join(sorted(fields))}"
                )
            changes[name] = _parse_value(name, raw, getattr(self, name), fields[name].type)
        return dataclasses.replace(self, **changes)


def _parse_value(name: str, raw: str, current: object, annotation: str) -> object:
    if raw.lower() in ("none", "off", "null"):
        return {} if isinstance(current, dict) else None
    try:
        if "dict" in str(annotation):  # "5:0.15,6:0.14"
            return {int(k): float(v) for k, v in (item.split(":") for item in raw.split(",") if item)}
        if "bool" in str(annotation):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if "int" in str(annotation):
            return int(raw)
        if "float" in str(annotation):
            return float(raw)
        return raw
    except ValueError as e:
        raise ValueError(f"--clean-set {name}={raw}: cannot parse as {annotation}") from e


PROFILES = ("prose", "code", "none")


def cleaning_profile(name: str) -> CleaningConfig | None:
    """The cleaning of a profile (None: no cleaning); `--clean-set` refines it."""
    if name == "prose":
        return CleaningConfig()
    if name == "code":
        off: dict = {name: None for name in _TEXT_RULES}
        off.update(max_top_ngram_chars_ratio={}, max_duplicate_ngram_chars_ratio={})
        return CleaningConfig(
            **off,
            unicode_form=None,
            strip_control_chars=False,
            drop_lorem_ipsum=False,
            max_chars=1_000_000,
            max_line_length=1000,
            max_mean_line_length=100.0,
            min_alnum_ratio=0.25,
        )
    if name == "none":
        return None
    raise ValueError(f"--clean-profile {name!r}: use one of {', '.join(PROFILES)}")


# The option that switches each drop reason off: `--clean-set FIELD=none` (or the flag itself).
REASON_SWITCHES = {
    "too_short": "--clean-set min_chars=none", "too_long": "--clean-set max_chars=none",
    "lorem_ipsum": "--clean-set drop_lorem_ipsum=false", "line_too_long": "--clean-set max_line_length=none",
    "mean_line_length": "--clean-set max_mean_line_length=none",
    "alnum_ratio": "--clean-set min_alnum_ratio=none", "too_few_words": "--clean-set min_words=none",
    "too_many_words": "--clean-set max_words=none",
    "mean_word_length": "--clean-set min_mean_word_length=none max_mean_word_length=none",
    "alpha_words": "--clean-set min_alpha_words_ratio=none",
    "symbol_ratio": "--clean-set max_symbol_word_ratio=none",
    "bullet_lines": "--clean-set max_bullet_lines_ratio=none",
    "ellipsis_lines": "--clean-set max_ellipsis_lines_ratio=none",
    "duplicate_lines": "--clean-set max_duplicate_lines_ratio=none",
    "duplicate_line_chars": "--clean-set max_duplicate_line_chars_ratio=none",
    "duplicate_paragraphs": "--clean-set max_duplicate_paragraphs_ratio=none",
    "duplicate_paragraph_chars": "--clean-set max_duplicate_paragraph_chars_ratio=none",
    "exact_duplicate": "--no-exact-dedup", "near_duplicate": "--no-near-dedup",
}  # fmt: skip


def reason_switch(reason: str) -> str | None:
    """The flag that stops `reason` from dropping documents (None: the input itself is at fault)."""
    if reason.startswith("top_") and reason.endswith("gram"):
        return "--clean-set max_top_ngram_chars_ratio=none"
    if reason.startswith("duplicate_") and reason.endswith("gram"):
        return "--clean-set max_duplicate_ngram_chars_ratio=none"
    return REASON_SWITCHES.get(reason)


def clean_text(text: str, config: CleaningConfig) -> str:
    """Normalised `text`: Unicode normal form, control characters removed."""
    if config.unicode_form is not None and not unicodedata.is_normalized(config.unicode_form, text):
        text = unicodedata.normalize(config.unicode_form, text)
    if config.strip_control_chars:
        text = _CONTROL.sub("", text)
    return text


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items, characters in them) that repeat an earlier item: everything but the first
    occurrence of each distinct item (sums over C-level maps, no Python loop per item)."""
    distinct = Counter(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


def _above(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _below(value: float, limit: float | None) -> bool:
    return limit is not None and value < limit


def _word_rules(words: Words, config: CleaningConfig) -> str | None:
    n = len(words)
    if _below(n, config.min_words):
        return "too_few_words"
    if _above(n, config.max_words):
        return "too_many_words"
    if n == 0:
        return None
    mean = float(words.chars.sum()) / n
    if _below(mean, config.min_mean_word_length) or _above(mean, config.max_mean_word_length):
        return "mean_word_length"
    if _below(float(words.has_alpha.mean()), config.min_alpha_words_ratio):
        return "alpha_words"
    return None


def _line_rules(text: str, num_words: int, config: CleaningConfig) -> str | None:
    if num_words and config.max_symbol_word_ratio is not None:
        hashes, ellipses = text.count("#"), sum(text.count(e) for e in _ELLIPSES)
        if max(hashes, ellipses) / num_words > config.max_symbol_word_ratio:
            return "symbol_ratio"
    # map() over unbound str methods keeps these passes out of the Python interpreter loop.
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    if not lines:
        return None
    if _above(sum(map(str.startswith, lines, repeat(_BULLETS))) / len(lines), config.max_bullet_lines_ratio):
        return "bullet_lines"
    if _above(sum(map(str.endswith, lines, repeat(_ELLIPSES))) / len(lines), config.max_ellipsis_lines_ratio):
        return "ellipsis_lines"
    total_chars = max(1, sum(map(len, lines)))
    dup, dup_chars = _duplicates(lines)
    if _above(dup / len(lines), config.max_duplicate_lines_ratio):
        return "duplicate_lines"
    if _above(dup_chars / total_chars, config.max_duplicate_line_chars_ratio):
        return "duplicate_line_chars"
    paragraphs = list(filter(None, map(str.strip, _PARAGRAPH_BREAK.split(text))))
    dup, dup_chars = _duplicates(paragraphs)
    if _above(dup / max(1, len(paragraphs)), config.max_duplicate_paragraphs_ratio):
        return "duplicate_paragraphs"
    if _above(dup_chars / total_chars, config.max_duplicate_paragraph_chars_ratio):
        return "duplicate_paragraph_chars"
    return None


def _ngram_rules(words: Words, config: CleaningConfig) -> str | None:
    """The first n-gram rule broken (C++, GIL released; `ngram_rules_reference` is the definition)."""
    top = sorted(config.max_top_ngram_chars_ratio.items())
    duplicate = sorted(config.max_duplicate_ngram_chars_ratio.items())
    return WORD_HASHER.ngram_reason(words.hashes, words.chars, top, duplicate)


def ngram_rules_reference(words: Words, config: CleaningConfig) -> str | None:
    """NumPy definition of the n-gram rules: the most frequent n-gram and the duplicated n-grams."""
    total = float(words.chars.sum())
    if total == 0:
        return None
    for n, limit in sorted(config.max_top_ngram_chars_ratio.items()):
        grams = words.ngram_hashes(n)
        if grams.size < 2:
            continue
        count, first = top_count(grams)
        if count > 1 and count * float(words.chars[first : first + n].sum()) / total > limit:
            return f"top_{n}gram"
    # Characters covered by duplicated n-grams shrink as n grows, so once the smallest n is below
    # every remaining limit, the larger n cannot fail and are skipped.
    items = sorted(config.max_duplicate_ngram_chars_ratio.items())
    for i, (n, limit) in enumerate(items):
        dup = duplicate_mask(words.ngram_hashes(n))
        fraction = float(words.chars[covered_words(dup, n, len(words))].sum()) / total if dup.any() else 0.0
        if fraction > limit:
            return f"duplicate_{n}gram"
        if all(fraction <= later for _, later in items[i + 1 :]):
            break
    return None


def _code_rules(text: str, config: CleaningConfig) -> str | None:
    rules = (config.max_line_length, config.max_mean_line_length, config.min_alnum_ratio)
    if rules == (None, None, None):
        return None
    lengths = list(map(len, text.split("\n")))
    if _above(max(lengths), config.max_line_length):
        return "line_too_long"
    if _above(len(text) / len(lengths), config.max_mean_line_length):
        return "mean_line_length"
    if text and _below(sum(map(str.isalnum, text)) / len(text), config.min_alnum_ratio):
        return "alnum_ratio"
    return None


_TEXT_RULES = (
    "min_words", "max_words", "min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio",
    "max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio",
    "max_duplicate_lines_ratio", "max_duplicate_line_chars_ratio", "max_duplicate_paragraphs_ratio",
    "max_duplicate_paragraph_chars_ratio", "max_top_ngram_chars_ratio", "max_duplicate_ngram_chars_ratio",
)  # fmt: skip


def _needs_words(config: CleaningConfig) -> bool:
    """Whether any word, line or n-gram rule is on (the `code` profile has none)."""
    return any(getattr(config, name) not in (None, {}) for name in _TEXT_RULES)


def quality_reason(text: str, config: CleaningConfig, words: Words | None = None) -> str | None:
    """The first quality rule `text` breaks, or None. `words` is `split_words(text)` when at hand."""
    if _below(len(text), config.min_chars):
        return "too_short"
    if _above(len(text), config.max_chars):
        return "too_long"
    if config.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    reason = _code_rules(text, config)
    if reason:
        return reason
    if not _needs_words(config):
        return None
    if words is None:
        words = split_words(text.encode("utf-8"), ascii_only=text.isascii())
    return _word_rules(words, config) or _line_rules(text, len(words), config) or _ngram_rules(words, config)


def clean_record(
    record: tuple[str, ...], config: CleaningConfig
) -> tuple[tuple[str, ...], list[Words], str | None]:
    """A record's texts normalised, the words of each, and the first quality rule one of them breaks
    (None when the record is kept). The preprocessing workers and the near-dup signature stage both
    decide a record's fate here, so they agree on which records are documents."""
    cleaned = tuple(clean_text(t, config) for t in record)
    words = [split_words(t.encode("utf-8"), t.isascii()) for t in cleaned]
    reason = next((r for r in map(quality_reason, cleaned, repeat(config), words) if r), None)
    return cleaned, words, reason
