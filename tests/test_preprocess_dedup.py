"""Exact digests, MinHash signature quality, LSH banding, and hash splits."""

import random

import numpy as np
import pytest

from megatron_andromeda.preprocess.dedup import LSHIndex, MinHasher, SeenDigests, exact_digest, lsh_bands
from megatron_andromeda.preprocess.split import Splitter, parse_split
from megatron_andromeda.preprocess.words import split_words

VOCAB = [f"w{i}" for i in range(5000)]


def _doc(rng, n):
    return [rng.choice(VOCAB) for _ in range(n)]


def _mutate(rng, words, edits):
    out = list(words)
    for _ in range(edits):
        out[rng.randrange(len(out))] = rng.choice(VOCAB)
    return out


def _jaccard(a, b, k=5):
    sa = {tuple(a[i : i + k]) for i in range(len(a) - k + 1)}
    sb = {tuple(b[i : i + k]) for i in range(len(b) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def _words(tokens):
    return split_words(" ".join(tokens).encode())


def test_exact_digest_ignores_case_and_whitespace_only():
    assert exact_digest("Hello   World\n") == exact_digest("hello world")
    assert exact_digest("hello world") != exact_digest("hello, world")
    seen = SeenDigests()
    assert seen.add_if_new(exact_digest("a b")) and not seen.add_if_new(exact_digest("A  B"))
    assert len(seen) == 1


def test_minhash_estimates_jaccard():
    """One-permutation hashing with densification is an unbiased Jaccard estimator, short docs included."""
    rng, hasher, errors = random.Random(0), MinHasher(), []
    for n in (20, 60, 300, 1500):
        for edits in (0, n // 20, n // 8, n // 3):
            a = _doc(rng, n)
            b = _mutate(rng, a, edits)
            sa, sb = hasher.signature(_words(a)), hasher.signature(_words(b))
            assert sa.shape == (128,) and sa.max() < 2**32
            errors.append(float((sa == sb).mean()) - _jaccard(a, b))
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.03  # no bias
    assert np.abs(errors).max() < 0.2  # standard error at 128 bins is <= 0.045


def test_signature_is_deterministic_and_fully_densified():
    hasher = MinHasher()
    short = _words(["just", "three", "words"])
    assert np.array_equal(hasher.signature(short), hasher.signature(_words(["JUST", "three", "words"])))
    assert len(set(hasher.signature(short).tolist())) == 1  # one shingle fills every bin
    assert not hasher.signature(split_words(b"")).any()


def test_lsh_bands_follow_the_threshold():
    bands, rows = lsh_bands(0.8, 128)
    assert bands * rows <= 128 and 5 <= bands <= 20
    low_bands, low_rows = lsh_bands(0.5, 128)
    assert low_rows < rows  # a lower threshold uses shorter bands
    with pytest.raises(ValueError, match="minhash-threshold"):
        MinHasher(threshold=1.0)


def test_lsh_index_flags_near_duplicates_only():
    rng, hasher = random.Random(1), MinHasher(threshold=0.8)
    index = LSHIndex(hasher.bands[0])
    base = _doc(rng, 400)
    near = _mutate(rng, base, 4)  # Jaccard ~0.9
    far = _mutate(rng, base, 120)  # Jaccard ~0.1
    assert _jaccard(base, near) > 0.85 and _jaccard(base, far) < 0.3
    assert index.add_if_new(hasher.band_keys(_words(base)))
    assert not index.add_if_new(hasher.band_keys(_words(near)))
    assert index.add_if_new(hasher.band_keys(_words(far)))
    assert index.add_if_new(hasher.band_keys(_words(_doc(rng, 400))))


def test_parse_split():
    assert parse_split("98,1,1") == pytest.approx((0.98, 0.01, 0.01))
    assert parse_split("90/10") == pytest.approx((0.9, 0.1, 0.0))
    assert parse_split("1") == (1.0, 0.0, 0.0)
    for bad in ("a,b", "0,0,0", "1,2,3,4", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_splitter_is_content_based_and_proportional():
    splitter = Splitter(parse_split("80,10,10"))
    docs = [f"document {i}".encode() for i in range(20000)]
    first = [splitter.split_of(d) for d in docs]
    assert first == [Splitter(parse_split("80,10,10")).split_of(d) for d in docs]  # stable across instances
    counts = np.bincount(first, minlength=3) / len(docs)
    assert counts == pytest.approx([0.8, 0.1, 0.1], abs=0.015)
    assert {Splitter((1.0, 0.0, 0.0)).split_of(d) for d in docs[:500]} == {0}
    assert set(Splitter((0.5, 0.0, 0.5)).split_of(d) for d in docs[:500]) == {0, 2}
