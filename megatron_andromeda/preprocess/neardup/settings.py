"""What a near-dup run is made with: MinHash, LSH banding and the text normalisation.

Every stage output records these settings (`NearDupSettings.as_dict`), and every stage that reads
another's output compares them, so signatures made with another signature length, shingle size,
banding, word hashing or cleaning are refused with the file and the field that differ, instead of
silently pairing documents that were never comparable.

Defaults, chosen on the labelled benchmark (`tools/make_neardup_benchmark.py`,
`tools/neardup_quality.py --sweep`, README "Near-duplicates across machines"): 128 permutations of
word 5-gram shingles, as the in-process MinHash, read as 16 bands of 7 rows (the first 112 values).
That is the best mean F1 of all 229 settings with a midpoint in [0.4, 0.95] over benchmarks made
with seeds 0, 1 and 2 (0.9875; 14-18 bands of 7 rows are all within 0.0004). Two documents become
candidates with probability 1 - (1 - s^7)^16 at Jaccard similarity s: 1/2 at s = 0.67, 0.98 at
s = 0.8, 0.12 at s = 0.5, 0.03 at s = 0.4.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.dedup import MinHasher, lsh_bands

# The word hashing of preprocess/words.py (ASCII case folding, whitespace words) and the shingle /
# signature construction of dedup.MinHasher: bump when either changes, so old signatures are refused.
SHINGLE_SCHEME = "words-v1/onepermutation-densified-v1"

DEFAULT_NUM_PERM = 128
DEFAULT_NGRAM = 5
DEFAULT_BANDS = 16
DEFAULT_ROWS = 7


@dataclass(frozen=True)
class NearDupSettings:
    """MinHash + LSH settings, the record fields and the cleaning that decides which records are
    documents (the same as the preprocessing run that applies the drop lists)."""

    num_perm: int = DEFAULT_NUM_PERM
    ngram: int = DEFAULT_NGRAM
    bands: int = DEFAULT_BANDS
    rows: int = DEFAULT_ROWS
    json_keys: tuple[str, ...] = ("text",)
    cleaning: CleaningConfig | None = field(default_factory=CleaningConfig)
    bands_per_task: int = 1  # bands one bucket task handles
    max_samples: int = 10  # sample clusters (and file:line samples per reason) in the reports

    def __post_init__(self) -> None:
        if self.num_perm < 2 or self.ngram < 1:
            raise ValueError(f"--num-perm {self.num_perm} must be >= 2 and --ngram {self.ngram} >= 1")
        if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"--bands {self.bands} x --rows {self.rows}: need bands, rows >= 1 and bands x rows <= "
                f"--num-perm {self.num_perm}"
            )
        if not 1 <= self.bands_per_task <= self.bands:
            raise ValueError(f"--bands-per-task {self.bands_per_task}: must be in [1, --bands {self.bands}]")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys {list(self.json_keys)}: need one or more distinct keys")
        if self.max_samples < 0:
            raise ValueError(f"--max-samples {self.max_samples}: must be >= 0")

    @classmethod
    def for_threshold(cls, threshold: float, num_perm: int = DEFAULT_NUM_PERM, **kw) -> NearDupSettings:
        """Bands and rows that best separate pairs above and below `threshold` (`dedup.lsh_bands`)."""
        bands, rows = lsh_bands(threshold, num_perm)
        return cls(num_perm=num_perm, bands=bands, rows=rows, **kw)

    @property
    def minhasher(self) -> MinHasher:
        """The in-process MinHash with these settings; only its signatures are used here, so its own
        threshold (which would choose its bands) is left at its default."""
        return MinHasher(num_perm=self.num_perm, ngram=self.ngram)

    @property
    def threshold(self) -> float:
        """Jaccard similarity at which a pair becomes a candidate with probability 1/2."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def candidate_probability(self, similarity: float) -> float:
        return 1.0 - (1.0 - similarity**self.rows) ** self.bands

    def as_dict(self) -> dict:
        """JSON-ready, with the shingle scheme: what stage outputs record and compare."""
        out = dataclasses.asdict(self)
        out["json_keys"] = list(self.json_keys)
        out["shingles"] = SHINGLE_SCHEME
        return json.loads(json.dumps(out))  # int dict keys of the cleaning rules become strings

    @classmethod
    def from_dict(cls, data: dict) -> NearDupSettings:
        data = {k: v for k, v in data.items() if k != "shingles"}
        if data.get("cleaning") is not None:
            data["cleaning"] = _cleaning_from_dict(data["cleaning"])
        data["json_keys"] = tuple(data["json_keys"])
        return cls(**data)


def _cleaning_from_dict(data: dict) -> CleaningConfig:
    rules = {}
    for name, value in data.items():
        rules[name] = {int(n): v for n, v in value.items()} if isinstance(value, dict) else value
    return CleaningConfig(**rules)


def differences(recorded: dict, expected: dict, prefix: str = "", wanted: str = "expected") -> list[str]:
    """'name is RECORDED, expected EXPECTED' for every field where two `as_dict` records disagree."""
    out = []
    for name in sorted(set(recorded) | set(expected)):
        a, b = recorded.get(name), expected.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{name}.", wanted)
        elif a != b:
            out.append(f"{prefix}{name} is {a!r}, {wanted} {b!r}")
    return out
