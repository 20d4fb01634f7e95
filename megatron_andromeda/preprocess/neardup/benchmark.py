"""A labelled near-duplicate benchmark made from real documents (`tools/make_neardup_benchmark.py`).

Real prose (the embedded Austen corpus) is edited under control: every variant of a source is
edited step by step until the exact Jaccard similarity of its word 5-gram shingle set with the
source (`jaccard`, with MinHash's normalisation) reaches a target drawn from the label's range, and
that measured similarity is recorded with it.

- duplicate (label: same family as its source), Jaccard in `duplicate_range`, by one kind of edit:
  `insertion` (phrases from other documents inserted), `deletion` (spans removed), `substitution`
  (single words replaced), `reorder` (paragraphs shuffled, then words replaced to reach the
  target), `boilerplate` (the header and footer chrome of a made-up web site added), `mixed`;
- related (its own family: must be kept), Jaccard in `related_range`: `excerpt` (a passage of the
  source inside another document's text), `rewrite` (the same edits as duplicates, much heavier),
  `template` (another document's passage under the same site chrome as a boilerplate duplicate;
  its similarity is measured against that duplicate);
- original / unrelated: the sources, and every other corpus document, untouched.

Nothing is generated between the two ranges: a benchmark says what a near-duplicate is, and the
gap is where labels are a matter of taste. The records are shuffled (seeded), so the first member
of a family is not always its source. Generation is deterministic (Python's `random.Random` with
a fixed seed) and keeps only records the default cleaning keeps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.neardup.signatures import document_words

DUPLICATE_EDITS = ("insertion", "deletion", "substitution", "reorder", "boilerplate", "mixed")
RELATED_EDITS = ("excerpt", "rewrite", "template")
Paragraphs = list[list[str]]  # a document: paragraphs of words (punctuation attached)


@dataclass(frozen=True)
class BenchmarkConfig:
    sources: int = 300  # documents that get variants
    duplicates_per_source: tuple[int, int] = (1, 3)  # inclusive range
    related_fraction: float = 0.6  # expected related documents per source
    duplicate_range: tuple[float, float] = (0.75, 1.0)
    related_range: tuple[float, float] = (0.2, 0.5)
    ngram: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.related_range
        dup_low, dup_high = self.duplicate_range
        if not 0.0 <= low <= high < dup_low <= dup_high <= 1.0:
            raise ValueError(
                f"--related-range {self.related_range} must lie below --duplicate-range "
                f"{self.duplicate_range}, within [0, 1]"
            )
        if self.sources < 1 or not 1 <= self.duplicates_per_source[0] <= self.duplicates_per_source[1]:
            raise ValueError(f"--sources {self.sources} / duplicates {self.duplicates_per_source}: need >= 1")


def shingles(text: str, n: int = 5) -> set[tuple[bytes, ...]]:
    """Word n-grams as MinHash sees them: whitespace-separated, ASCII case folded."""
    words = text.encode("utf-8").lower().split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def render(paragraphs: Paragraphs) -> str:
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def parse(text: str) -> Paragraphs:
    return [p.split() for p in text.split("\n\n") if p.split()]


# ------------------------------------------------------------------------------- edits, k at a time
def _position(paragraphs: Paragraphs, rng: random.Random) -> tuple[int, int]:
    """A uniformly random word position (paragraph, index)."""
    sizes = [len(p) for p in paragraphs]
    at = rng.randrange(max(sum(sizes), 1))
    for i, size in enumerate(sizes):
        if at < size:
            return i, at
        at -= size
    return len(paragraphs) - 1, 0


def _edit_once(paragraphs: Paragraphs, kind: str, rng: random.Random, pool: Sequence[str]) -> None:
    p, i = _position(paragraphs, rng)
    if kind == "mixed":
        kind = rng.choice(("insertion", "deletion", "substitution"))
    if kind == "insertion":
        start = rng.randrange(len(pool) - 12)
        paragraphs[p][i:i] = pool[start : start + rng.randint(3, 12)]
    elif kind == "deletion":
        del paragraphs[p][i : i + rng.randint(1, 8)]
    else:  # substitution
        if paragraphs[p]:
            paragraphs[p][i] = rng.choice(pool)


def _edited(source: Paragraphs, kind: str, k: int, seed: int, pool: Sequence[str], chrome: Paragraphs) -> str:
    """`source` after the first k edits of the edit sequence `seed` gives (a prefix of the same edits
    for every k, so the similarity falls step by step as k grows)."""
    rng = random.Random(seed)
    paragraphs = [list(p) for p in source]
    if kind == "boilerplate":  # k lines of site chrome, alternately above and below the text
        header = [chrome[j] for j in range(0, k, 2)]
        footer = [chrome[j] for j in range(1, k, 2)]
        return render([*header, *paragraphs, *footer])
    step_kind = kind
    if kind == "reorder":
        rng.shuffle(paragraphs)
        step_kind = "substitution"
    for _ in range(k):
        _edit_once(paragraphs, step_kind, rng, pool)
    return render(paragraphs)


def edit_to_target(
    make: Callable[[int], str], reference: set, target: float, most: int, ngram: int
) -> tuple[str, float]:
    """The text of the largest k in [0, most] whose similarity to `reference` is still >= target
    (binary search over k; similarity falls with k), with that similarity."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        if jaccard(shingles(make(mid), ngram), reference) >= target:
            low = mid
        else:
            high = mid - 1
    text = make(low)
    return text, jaccard(shingles(text, ngram), reference)


def site_chrome(rng: random.Random, lines: int = 160) -> Paragraphs:
    """Navigation, notices and footer lines of a made-up web site (its own words, so two sites share
    little), as paragraphs of 6-14 words."""
    name = "".join(rng.choice("bcdfghklmnprstvw") + rng.choice("aeiou") for _ in range(3)).capitalize()
    words = [
        "Home", "News", "About", "Contact", "Subscribe", "Archive", "Books", "Reviews", "Classics",
        "Newsletter", "Privacy", "Terms", "Cookies", "Share", "Print", "Email", "Follow", "Login",
        "Register", "Search", "Donate", "Support", "Authors", "Library", "Events", "Shop", "Help",
        "Accessibility", "Sitemap", "Careers", "Advertise", "Feedback", "Editions", "Chapters",
    ]  # fmt: skip
    out = []
    for _ in range(lines):
        line = [rng.choice(words) for _ in range(rng.randint(6, 14))]
        line.insert(rng.randrange(len(line)), f"{name}{rng.randint(1, 999)}")
        out.append(line)
    return out


# ---------------------------------------------------------------------------------------- generation
@dataclass
class _Context:
    config: BenchmarkConfig
    rng: random.Random
    pool: list[str]  # words of the documents that are not sources, for insertions and filler
    cleaning: CleaningConfig

    def phrases(self, seed: int, words: int) -> list[str]:
        """`words` words of short phrases (3-12 words) from random places of the pool."""
        rng, out = random.Random(seed), []
        while len(out) < words:
            start = rng.randrange(len(self.pool) - 12)
            out += self.pool[start : start + rng.randint(3, 12)]
        return out[:words]

    def is_document(self, text: str) -> bool:
        return not isinstance(document_words((text,), self.cleaning), str)


def _variant(ctx: _Context, source: str, kind: str, target: float) -> tuple[str, float]:
    """A variant of `source` by edit `kind`, as close above `target` similarity as the steps allow."""
    paragraphs, ngram = parse(source), ctx.config.ngram
    reference = shingles(source, ngram)
    seed = ctx.rng.randrange(2**32)
    words = sum(map(len, paragraphs))
    if kind == "excerpt":  # a shrinking passage of the source among growing filler from elsewhere
        flat = [w for p in paragraphs for w in p]
        start, filler = ctx.rng.random(), ctx.phrases(seed, words)

        def make(k: int) -> str:
            keep = words - k
            first = int(start * k)
            return " ".join(filler[:first] + flat[first : first + keep] + filler[first:k])

        return edit_to_target(make, reference, target, words - ngram, ngram)
    chrome = site_chrome(random.Random(seed))
    most = len(chrome) if kind == "boilerplate" else words
    return edit_to_target(lambda k: _edited(paragraphs, kind, k, seed, ctx.pool, chrome), reference,
                          target, most, ngram)  # fmt: skip


def _template_pair(ctx: _Context, first: str, second: str, target: float) -> tuple[str, str, float]:
    """Passages of two different documents under the same site chrome (~600 words of it): distinct
    documents whose similarity is all boilerplate. The second passage grows until the pair's
    similarity falls to `target`."""
    chrome = site_chrome(random.Random(ctx.rng.randrange(2**32)), lines=60)
    header, footer = chrome[:30], chrome[30:]
    a = render([*header, first.split()[:200], *footer])
    b_words = second.split()
    reference = shingles(a, ctx.config.ngram)
    make = lambda k: render([*header, b_words[: 50 + k], *footer])  # noqa: E731
    b, similarity = edit_to_target(make, reference, target, max(len(b_words) - 50, 0), ctx.config.ngram)
    return a, b, similarity


def make_benchmark(texts: Sequence[str], config: BenchmarkConfig) -> list[dict]:
    """Labelled records (text, id, family, kind, edit, jaccard, of), shuffled."""
    rng = random.Random(config.seed)
    ctx = _Context(config, rng, [], CleaningConfig())
    usable = [i for i, t in enumerate(texts) if ctx.is_document(t)]
    order = rng.sample(usable, len(usable))
    if len(order) < 2 * config.sources:
        raise ValueError(
            f"--sources {config.sources}: the corpus has {len(usable)} documents; need twice that"
        )
    sources, others = order[: config.sources], order[config.sources :]
    ctx.pool.extend(w for i in others for w in texts[i].split())
    records = [{"text": texts[i], "id": f"doc{i:05d}", "family": f"doc{i:05d}",
                "kind": "original" if i in set(sources) else "unrelated", "edit": None, "jaccard": None,
                "of": None} for i in usable]  # fmt: skip
    for number, i in enumerate(sources):
        records += _variants_of(ctx, texts, i, others, number)
    rng.shuffle(records)
    return records


def _variants_of(ctx: _Context, texts: Sequence[str], i: int, others: list[int], number: int) -> list[dict]:
    config, rng, out = ctx.config, ctx.rng, []
    source_id = f"doc{i:05d}"
    for d in range(rng.randint(*config.duplicates_per_source)):
        kind = rng.choice(DUPLICATE_EDITS)
        text, similarity = _variant(ctx, texts[i], kind, rng.uniform(*config.duplicate_range))
        out.append({"text": text, "id": f"dup{number:04d}.{d}", "family": source_id, "kind": "duplicate",
                    "edit": kind, "jaccard": round(similarity, 4), "of": source_id})  # fmt: skip
    if rng.random() < config.related_fraction:
        kind, target = rng.choice(RELATED_EDITS), rng.uniform(*config.related_range)
        if kind == "template":
            x, y = rng.sample(others, 2)
            a, b, similarity = _template_pair(ctx, texts[x], texts[y], target)
            ids = (f"rel{number:04d}.a", f"rel{number:04d}.b")
            for rid, text, of in ((ids[0], a, ids[1]), (ids[1], b, ids[0])):
                out.append({"text": text, "id": rid, "family": rid, "kind": "related", "edit": kind,
                            "jaccard": round(similarity, 4), "of": of})  # fmt: skip
        else:
            edit = (
                "excerpt"
                if kind == "excerpt"
                else rng.choice(("insertion", "deletion", "substitution", "mixed"))
            )
            text, similarity = _variant(ctx, texts[i], edit, target)
            rid = f"rel{number:04d}"
            out.append({"text": text, "id": rid, "family": rid, "kind": "related",
                        "edit": "excerpt" if kind == "excerpt" else f"rewrite/{edit}",
                        "jaccard": round(similarity, 4), "of": source_id})  # fmt: skip
    return [r for r in out if _in_range(r, config) and ctx.is_document(r["text"])]


def _in_range(record: dict, config: BenchmarkConfig) -> bool:
    low, high = config.duplicate_range if record["kind"] == "duplicate" else config.related_range
    return low <= record["jaccard"] <= high
