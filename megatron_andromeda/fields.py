"""Config fields that carry their own help text, choices and valid range.

Every section of the run config (and `models.config.ModelConfig`) declares its fields with
`option(default, help, ...)`. One generic check then validates every field against its choices and
range, with the field named in the error, and `describe_section` prints the same help text that
`python -m megatron_andromeda.train --help` shows, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from megatron_andromeda.errors import ConfigError

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    factory: Any = _MISSING,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with help text and its valid values (`min`/`max` inclusive, `above`/`below` strict).

    None is always accepted for fields annotated `X | None` (it means "derive the default").
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above, "below": below}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(section: Any, prefix: str) -> None:
    """Raise ConfigError for the first field of `section` outside its choices or range."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is None or not f.metadata:
            continue
        name = f"{prefix}.{f.name}"
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
        problem = _range_problem(value, f.metadata)
        if problem:
            raise ConfigError(f"{name}={value!r} {problem}")


def _range_problem(value: Any, meta: dict[str, Any]) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    lo, hi, above, below = meta.get("min"), meta.get("max"), meta.get("above"), meta.get("below")
    if value != value or value in (float("inf"), float("-inf")):
        return "is not a finite number"
    if lo is not None and value < lo:
        return "must be positive" if lo == 1 and isinstance(value, int) else f"must be >= {lo}"
    if hi is not None and value > hi:
        return f"must be <= {hi}"
    if above is not None and value <= above:
        return f"must be > {above}"
    if below is not None and value >= below:
        return f"must be < {below}"
    return None


def describe_section(cls: type, prefix: str) -> list[str]:
    """One line per field: `prefix.name  type = default  help [valid values]`."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        meta = f.metadata or {}
        default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
        kind = _type_name(hints[f.name])
        valid = _valid_text(meta)
        text = meta.get("help", "")
        lines.append(f"  {prefix}.{f.name} ({kind}, default {default!r}){': ' + text if text else ''}{valid}")
    return lines


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(args[0])}]"
    if args and type(None) in args:
        return " | ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def _valid_text(meta: dict[str, Any]) -> str:
    if meta.get("choices"):
        return f" [one of: {', '.join(map(str, meta['choices']))}]"
    parts = []
    for key, sign in (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sign} {meta[key]}")
    return f" [{', '.join(parts)}]" if parts else ""
