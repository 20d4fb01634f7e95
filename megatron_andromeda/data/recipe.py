"""Stage recipes: which sources a training stage reads, with weights or token budgets.

A recipe is a YAML file:

    name: stage1-high-priority
    tokens: 2.0e10                # the stage's token budget (optional; the run config may set it)
    sources:
      - name: c4                  # a label for reports
        prefix: data/c4/en        # the --output-prefix given to tools/preprocess_data.py
        weight: 0.3               # share of the stage's samples ...
        clean_profile: prose      # the --clean-profile its preprocessing needs (code for source files)
      - name: openwebtext
        prefix: data/openwebtext/owt
        tokens: 5.0e9             # ... or a token budget (shares are then budget / total)

`tools/preprocess_data.py --output-prefix P` writes `P_train_text_document`, `P_valid_...` and
`P_test_...`; a recipe names P, and each split of the run reads the matching files. A source may
instead give `train:` / `valid:` / `test:` dataset prefixes explicitly (Megatron datasets made
elsewhere). Sources are never mixed between splits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_andromeda.data.blend import Blend, normalise
from megatron_andromeda.errors import ConfigError

CLEAN_PROFILES = ("prose", "code", "none")  # preprocess.cleaning.PROFILES (data/ does not import it)

SPLIT_SUFFIX = {
    "train": "_train_text_document",
    "valid": "_valid_text_document",
    "test": "_test_text_document",
}

# Sources that are (or contain) standard evaluation sets: training on them contaminates the results.
EVALUATION_SETS = (
    "piqa", "super_glue", "superglue", "glue", "humaneval", "openai_humaneval", "hellaswag", "arc_easy",
    "arc_challenge", "ai2_arc", "boolq", "winogrande", "lambada", "mmlu", "triviaqa", "squad", "gsm8k",
    "mathqa",
)  # fmt: skip


@dataclass
class Source:
    name: str
    prefix: str = ""
    weight: float | None = None
    tokens: float | None = None
    train: str = ""
    valid: str = ""
    test: str = ""
    clean_profile: str = "prose"  # the tools/preprocess_data.py --clean-profile this source calls for

    def dataset(self, split: str) -> str:
        explicit = getattr(self, split)
        if explicit:
            return explicit
        return f"{self.prefix}{SPLIT_SUFFIX[split]}" if self.prefix else ""

    @property
    def is_evaluation_set(self) -> bool:
        text = f"{self.name} {self.prefix}".lower().replace("-", "_")
        return any(name in text for name in EVALUATION_SETS)


@dataclass
class Recipe:
    name: str
    sources: list[Source]
    tokens: float | None = None  # the stage's token budget, unless the stage config gives its own
    description: str = ""
    path: str = ""

    def weights(self) -> list[float]:
        """Sampling shares of every source, from weights or from token budgets."""
        return normalise([s.weight if s.weight is not None else s.tokens for s in self.sources], self.path)

    def blend(self, split: str) -> Blend:
        """The blend of one split, named by the recipe's sources; sources without that split drop out."""
        entries = []
        for source in self.sources:
            raw = source.weight if source.weight is not None else source.tokens
            dataset = source.dataset(split)
            if dataset and raw > 0 and (split == "train" or Path(dataset + ".idx").exists()):
                entries.append((source.name, dataset, raw))
        return Blend.of(entries, f"recipe {self.path or self.name}: {split}")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data recipe {path} does not exist (examples/data/ has recipes to start from)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise ConfigError(f"{path}: a recipe needs a non-empty `sources:` list")
    known = {f.name for f in dataclasses.fields(Source)}
    sources = []
    for i, entry in enumerate(raw["sources"]):
        where = f"{path}: sources[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping with name, prefix and weight or tokens")
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)} (valid: {sorted(known)})")
        source = Source(**{k: (float(v) if k in ("weight", "tokens") else v) for k, v in entry.items()})
        if source.clean_profile not in CLEAN_PROFILES:
            raise ConfigError(
                f"{where} ({source.name}): clean_profile {source.clean_profile!r} is not one of "
                f"{', '.join(CLEAN_PROFILES)}"
            )
        _check_source(source, where)
        sources.append(source)
    kinds = {s.weight is not None for s in sources}
    if len(kinds) > 1:
        raise ConfigError(f"{path}: give every source a weight, or every source a token budget, not a mix")
    extra = set(raw) - {"name", "sources", "tokens", "description"}
    if extra:
        raise ConfigError(f"{path}: unknown keys {sorted(extra)} (valid: name, description, tokens, sources)")
    tokens = float(raw["tokens"]) if raw.get("tokens") is not None else None
    return Recipe(raw.get("name", path.stem), sources, tokens, raw.get("description", ""), str(path))


def stage_token_budget(tokens: float | None, recipe: Recipe | None, where: str) -> float:
    """A stage's token budget, owned by one rule: the stage's own `tokens`, else its recipe's `tokens:`.

    Training (`stages[i].tokens` or the recipe) and tools/plan_data.py (`--tokens` or the recipe)
    both ask here.
    """
    budget = tokens if tokens is not None else (recipe.tokens if recipe is not None else None)
    if budget is None:
        raise ConfigError(
            f"{where}: no token budget: give `tokens` (or `steps`) for the stage, or `tokens:` in its recipe"
        )
    if not (budget > 0 and budget != float("inf")):
        raise ConfigError(f"{where}: the token budget must be a positive number, got {budget}")
    return float(budget)


def _check_source(source: Source, where: str) -> None:
    if not source.prefix and not source.train:
        raise ConfigError(f"{where} ({source.name}) needs `prefix` (or an explicit `train` dataset)")
    if (source.weight is None) == (source.tokens is None):
        raise ConfigError(f"{where} ({source.name}) needs exactly one of `weight` and `tokens`")
    value = source.weight if source.weight is not None else source.tokens
    if value < 0:
        raise ConfigError(f"{where} ({source.name}): weight/tokens must be >= 0")


@dataclass
class SourcePlan:
    name: str
    tokens_in_source: int
    proportion: float
    effective_tokens: float
    is_evaluation_set: bool

    @property
    def epochs(self) -> float:
        return self.effective_tokens / self.tokens_in_source if self.tokens_in_source else float("inf")


@dataclass
class StagePlan:
    recipe: Recipe
    budget: float
    sources: list[SourcePlan] = field(default_factory=list)


def plan_stage(recipe: Recipe, budget: float, tokens_in_source: list[int]) -> StagePlan:
    """The MPT-style table: how many tokens each source contributes and how many epochs that is."""
    plan = StagePlan(recipe, budget)
    for source, share, available in zip(recipe.sources, recipe.weights(), tokens_in_source):
        plan.sources.append(
            SourcePlan(source.name, available, share, share * budget, source.is_evaluation_set)
        )
    return plan
