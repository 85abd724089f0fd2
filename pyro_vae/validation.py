"""Argument checks shared by constructors and configs, and the registries' decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["check_key", "check_positive_int", "registrar"]

_C = TypeVar("_C", bound=type)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (bools refused); otherwise a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def registrar(table: dict[str, _C], kind: str) -> Callable[[str], Callable[[_C], _C]]:
    """A class decorator factory adding classes to ``table`` (a duplicate key is an error)."""

    def register(key: str) -> Callable[[_C], _C]:
        def add(cls: _C) -> _C:
            if key in table:
                raise ValueError(f"{kind} {key!r} is already registered by {table[key].__name__}")
            table[key] = cls
            cls.key = key
            return cls

        return add

    return register


def check_key(table: dict[str, Any], kind: str, key: str) -> None:
    """ValueError listing the choices when ``key`` is not in ``table``."""
    if key not in table:
        raise ValueError(f"unknown {kind} {key!r}; choose one of {', '.join(sorted(table))}")
