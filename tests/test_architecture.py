"""The layering, as a test: lower layers never import higher ones.

    errors, fields                       leaves: import nothing of the package
    models/                              math only (its config and presets included)
    config, kernels, te_layers, data/,   configuration, kernel choice and swaps, datasets,
    preprocess/                          the data pipeline
    parallel/                            layout, process groups, every model-parallel collective
    checkpoint/, builder                 distributed checkpoints; the one model builder
    training/, evaluation/, hf/, ...     the loop and what reads checkpoints
    train                                the entry point (imported by tools/ and tests only)

Every import of every module of the package is read with `ast` (TYPE_CHECKING imports included)
and checked against the rules below; a new import that breaks one fails here with its file and line.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_andromeda"


@dataclass(frozen=True)
class Rule:
    source: str  # the importing part of the package ("*": every part)
    only: frozenset[str] | None = None  # the parts it may import (None: any not in `never`)
    never: frozenset[str] = frozenset()
    why: str = ""

    def allows(self, target: str) -> bool:
        if target == self.source:
            return True
        return target not in self.never and (self.only is None or target in self.only)


ABOVE_DATA = frozenset(
    {"models", "parallel", "training", "checkpoint", "evaluation", "hf", "builder", "train"}
)
RULES = [
    Rule("errors", only=frozenset(), why="a leaf module"),
    Rule("fields", only=frozenset({"errors"}), why="a leaf module"),
    Rule("models", only=frozenset({"errors", "fields"}), why="models/ is math only"),
    Rule("data", never=ABOVE_DATA, why="data/ never imports models/ or the layers above it"),
    Rule("preprocess", never=ABOVE_DATA, why="the data pipeline needs no model"),
    Rule("kernels", never=ABOVE_DATA - {"models"}, why="kernels are chosen below parallel/"),
    Rule("te_layers", never=ABOVE_DATA - {"models"}, why="the TE swap is a kernel, below parallel/"),
    Rule("parallel", never=(ABOVE_DATA | {"preprocess"}) - {"models", "parallel"},
         why="parallel/ never imports training/ (the trainer's contract lives in parallel/hooks.py)"),
    Rule("checkpoint", never=frozenset({"training", "evaluation", "builder", "train"}), why="below the loop"),
    Rule("evaluation", never=frozenset({"training", "train"}), why="reads checkpoints via checkpoint/"),
    Rule("hf", never=frozenset({"training", "evaluation", "train"}), why="reads checkpoints via checkpoint/"),
    Rule("training", never=frozenset({"evaluation", "hf", "train"}), why="the loop knows no callers"),
    Rule("*", never=frozenset({"tools"}), why="nothing in the package imports tools/"),
]  # fmt: skip
DISTRIBUTED_USERS = {
    "parallel",
    "data",
    "checkpoint",
}  # data/checkpoint: rank-0-builds / barrier coordination


@dataclass(frozen=True)
class Import:
    source: str  # the importing module's part ("parallel", "config", ...)
    target: str  # the imported module, dotted
    where: str  # file:line


def _part(module: str) -> str:
    """megatron_andromeda.parallel.hooks -> parallel; megatron_andromeda.config -> config."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.cache
def package_imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = module.split(".")[
                        : len(module.split(".")) - node.level + (1 if is_package else 0)
                    ]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                found.append(Import(_part(module), target, f"{path.relative_to(ROOT)}:{node.lineno}"))
    return found


def test_the_scan_sees_the_package():
    imports = package_imports()
    assert any(i.source == "parallel" and i.target.startswith("megatron_andromeda.models") for i in imports)
    assert any(i.source == "train" and _part(i.target) == "builder" for i in imports)


def _target_part(target: str) -> str | None:
    if target == "tools" or target.startswith("tools."):
        return "tools"
    return _part(target) if target.startswith("megatron_andromeda.") else None


@pytest.mark.parametrize("rule", RULES, ids=[rule.source for rule in RULES])
def test_no_package_imports_a_layer_above_it(rule):
    bad = []
    for imp in package_imports():
        target = _target_part(imp.target)
        if target is None or rule.source not in ("*", imp.source) or imp.source == target:
            continue
        if not rule.allows(target):
            bad.append(f"{imp.where}: {imp.target}")
    assert not bad, f"{rule.source}: {rule.why}; offending imports:\n" + "\n".join(bad)


def test_torch_distributed_is_used_only_where_documented():
    users = {
        imp.where
        for imp in package_imports()
        if imp.target.startswith("torch.distributed") and imp.source not in DISTRIBUTED_USERS
    }
    assert not users, f"torch.distributed outside {sorted(DISTRIBUTED_USERS)}: {sorted(users)}"


def test_tools_do_not_edit_sys_path():
    offenders = [p.name for p in (ROOT / "tools").glob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, f"tools that edit sys.path (the package is installed): {offenders}"
