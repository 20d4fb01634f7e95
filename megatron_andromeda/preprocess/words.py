"""Vectorised word statistics and word n-gram hashes of a UTF-8 document (numpy, no Python loop).

The quality rules (`cleaning.py`) and the MinHash signatures (`dedup.py`) both look at a document as a
sequence of whitespace-separated words. Hashing every word in Python (or even `str.split()`, which
allocates an object per word) would cost about as much as tokenizing, so a document's UTF-8 bytes are
hashed in a dozen numpy passes: each byte pair (previous byte, byte) picks a random 64-bit value from
a table, and two segmented sums per word (`np.add.reduceat`) of the pairs from its first byte to the
whitespace after it, one plain and one weighted by the position in the word, give the word's hash.
Words are split on ASCII whitespace and controls, case-folded on ASCII letters; "letters" are ASCII
letters and any non-ASCII character (most non-ASCII text is letters).

All hashes are deterministic (fixed seeds, no PYTHONHASHSEED), so every worker process and every rerun
agrees on them. `split_words` runs the same arithmetic in one C++ pass (csrc/preprocess_fast.cpp);
`split_words_reference` is the NumPy definition a property test holds it equal to.
"""

from __future__ import annotations

import numpy as np

from megatron_andromeda.preprocess import _fast

_U64 = np.uint64


def _odd_constants(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random odd uint64 constants (odd multipliers are invertible mod 2^64)."""
    return np.random.default_rng(seed).integers(0, 2**63, size=shape, dtype=np.uint64) * _U64(2) + _U64(1)


_PAIR_TABLE = _odd_constants(0x5EED_0001, (1 << 16,))  # per (previous byte, byte) value
_PAIR_TABLE[(32 << 8) | 32] = 0  # whitespace between words adds nothing to a word's sum
_NGRAM_MULT = list(_odd_constants(0x5EED_0002, (64,)))  # per position inside an n-gram (np.uint64 scalars)
# The C++ word hasher and n-gram rules, holding (copies of) the two tables above; read-only.
WORD_HASHER = _fast.WordHasher(_PAIR_TABLE, np.asarray(_NGRAM_MULT, dtype=np.uint64))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic): a strong bit mixer."""
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


class Words:
    """The words of one document, with their n-gram hashes computed on demand (n ascending is cheapest)."""

    def __init__(self, hashes: np.ndarray, chars: np.ndarray, has_alpha: np.ndarray) -> None:
        self.hashes = hashes  # (W,) uint64, case-folded
        self.chars = chars  # (W,) int64 characters per word
        self.has_alpha = has_alpha  # (W,) bool: the word contains a letter
        self._grams = {1: hashes * _NGRAM_MULT[0]}  # n -> (W - n + 1,) uint64

    def __len__(self) -> int:
        return int(self.hashes.size)

    def ngram_hashes(self, n: int) -> np.ndarray:
        """(W - n + 1,) uint64 order-sensitive n-gram hashes (not bit-mixed); empty when W < n."""
        if len(self) < n:
            return np.zeros(0, dtype=np.uint64)
        m = max(k for k in self._grams if k <= n)
        grams = self._grams[m]
        for k in range(m + 1, n + 1):  # g_k[i] = g_{k-1}[i] + h[i + k - 1] * M_{k-1}
            grams = grams[:-1] + self.hashes[k - 1 :] * _NGRAM_MULT[(k - 1) % len(_NGRAM_MULT)]
            self._grams[k] = grams
        return grams


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """(W - n + 1,) the hashes `Words.ngram_hashes(n)` gives, of any word-hash array: several
    documents back to back, say, whose n-grams across a boundary the caller then leaves out."""
    grams = hashes[: hashes.size - n + 1] * _NGRAM_MULT[0]
    for k in range(1, n):  # the same sum as the recurrence in Words.ngram_hashes (wrapping uint64)
        grams += hashes[k : hashes.size - n + 1 + k] * _NGRAM_MULT[k % len(_NGRAM_MULT)]
    return grams


def split_words(data: bytes, ascii_only: bool = False) -> Words:
    """Words of UTF-8 `data`; `ascii_only` promises no multi-byte characters (saves a pass)."""
    return Words(*WORD_HASHER.split(data, ascii_only))


def split_words_reference(data: bytes, ascii_only: bool = False) -> Words:
    """NumPy definition of `split_words`."""
    raw = np.frombuffer(b" " + data + b" ", dtype=np.uint8)  # (N,) whitespace-framed
    in_word = raw > 32  # ASCII controls count as whitespace too
    starts = np.flatnonzero(in_word[1:] & ~in_word[:-1]) + 1  # (W,)
    if starts.size == 0:
        return Words(np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, bool))
    ends = np.flatnonzero(in_word[:-1] & ~in_word[1:]) + 1  # (W,) one past each word
    upper = (raw >= 65) & (raw <= 90)
    canon = np.where(in_word, raw | (upper.view(np.uint8) << 5), 32).astype(np.uint16)  # lower case, spaces
    values = _PAIR_TABLE[(canon[:-1] << 8) | canon[1:]]  # (N-1,) pair ending at byte i+1; space-space is 0
    # Two sums per word, plain and weighted by position, so reordered pairs ("12131" vs "13121") differ:
    # sum(v_i * (i - s)) = sum(v_i * i) - s * sum(v_i) for a word whose pairs start at index s.
    first = (starts - 1).astype(np.uint64)
    plain = np.add.reduceat(values, starts - 1)
    weighted = np.add.reduceat(values * np.arange(values.size, dtype=np.uint64), starts - 1) - first * plain
    hashes = splitmix64(splitmix64(plain) ^ weighted)
    chars = (ends - starts).astype(np.int64)
    if not ascii_only:
        continuation = np.cumsum((raw & 0xC0) == 0x80, dtype=np.int64)
        chars -= continuation[ends - 1] - continuation[starts - 1]
    letters = np.cumsum(((canon >= 97) & (canon <= 122)) | (canon >= 128), dtype=np.int64)
    has_alpha = letters[ends - 1] > letters[starts - 1]
    return Words(hashes, chars, has_alpha)


def duplicate_mask(hashes: np.ndarray) -> np.ndarray:
    """(K,) bool: hash i occurs more than once in `hashes`."""
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size == 0:
        return np.zeros(hashes.size, dtype=bool)
    repeated = np.unique(repeated)
    where = np.minimum(np.searchsorted(repeated, hashes), repeated.size - 1)
    return repeated[where] == hashes


def top_count(hashes: np.ndarray) -> tuple[int, int]:
    """(count, first index) of the most frequent hash; (0, -1) when `hashes` is empty."""
    if hashes.size == 0:
        return 0, -1
    ordered = np.sort(hashes)
    bounds = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1], [True])))
    runs = np.diff(bounds)
    best = int(np.argmax(runs))
    first = int(np.flatnonzero(hashes == ordered[bounds[best]])[0])
    return int(runs[best]), first


def covered_words(starts_mask: np.ndarray, n: int, num_words: int) -> np.ndarray:
    """(W,) bool: word w lies inside some n-gram whose start index is set in `starts_mask`."""
    delta = np.zeros(num_words + 1, dtype=np.int64)
    delta[: starts_mask.size] += starts_mask
    delta[n : n + starts_mask.size] -= starts_mask
    return np.cumsum(delta[:num_words]) > 0
