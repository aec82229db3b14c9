"""Typed readers for manifest.json values: each returns the value or raises one ArtifactError line
naming the field (``where``), so a malformed or edited manifest never reaches an engine."""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from kvc.errors import ArtifactError

E = TypeVar("E", bound=enum.Enum)
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_DIM = 1 << 40  # far above any real tensor dimension; stops absurd allocations


def bad(where: str, what: str) -> ArtifactError:
    return ArtifactError(f"manifest.json field {where}: {what}; the artifact is malformed or edited, recompile it")


def mapping(value: Any, where: str, required: set[str] | None = None, optional: set[str] = frozenset()) -> dict:
    """A JSON object; with ``required``, exactly those keys plus any of ``optional``."""
    if not isinstance(value, Mapping):
        raise bad(where, f"expected an object, got {type(value).__name__}")
    if required is not None:
        missing = sorted(required - set(value))
        unknown = sorted(set(value) - required - set(optional))
        if missing:
            raise bad(where, f"missing {', '.join(missing)}")
        if unknown:
            raise bad(where, f"unknown field {', '.join(map(repr, unknown))}")
    return dict(value)


def integer(value: Any, where: str, low: int = 0, high: int = MAX_DIM) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(where, f"expected an integer in [{low}, {high}], got {value!r}")
    return value


def optional_integer(value: Any, where: str, low: int = 0, high: int = MAX_DIM) -> int | None:
    return None if value is None else integer(value, where, low, high)


def string(value: Any, where: str, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise bad(where, f"expected a {'matching ' if pattern else ''}string, got {value!r}")
    return value


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise bad(where, f"expected true or false, got {value!r}")
    return value


def choice(value: Any, enum_type: type[E], where: str) -> E:
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        names = ", ".join(str(e.value) for e in enum_type)
        raise bad(where, f"expected one of {names}, got {value!r}") from None


def one_of(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise bad(where, f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


def string_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise bad(where, f"expected a list of strings, got {type(value).__name__}")
    return tuple(string(v, f"{where}[{i}]") for i, v in enumerate(value))


def string_map(value: Any, where: str) -> dict[str, str]:
    return {string(k, where): string(v, f"{where}.{k}") for k, v in mapping(value, where).items()}


def sha256_map(value: Any, where: str) -> dict[str, str]:
    return {string(k, where): string(v, f"{where}.{k}", _SHA256) for k, v in mapping(value, where).items()}


def shape(value: Any, where: str) -> tuple[int | str, ...]:
    """A tensor shape: static dims (ints) and symbol names."""
    if not isinstance(value, list) or len(value) > 8:
        raise bad(where, f"expected a list of at most 8 dimensions, got {value!r}")
    return tuple(d if isinstance(d, str) and _SYMBOL.match(d) else integer(d, f"{where}[{i}]")
                 for i, d in enumerate(value))


def token_ids(value: Any, where: str, vocab: int) -> tuple[int, ...]:
    """One id or a list of ids, each in [0, vocab)."""
    values = value if isinstance(value, list) else [value]
    return tuple(integer(v, where, 0, vocab - 1) for v in values)


_SYMBOL_DASH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")  # LLVM CPU names (e.g. znver3, x86-64)
