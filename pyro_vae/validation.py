"""Argument checks shared by constructors and configs, and the registries' decorator."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["check_key", "check_memory", "check_positive_int", "physical_memory", "registrar"]

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


def physical_memory() -> int:
    """Bytes of this machine's main memory (a large number where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 2**50


def check_memory(what: str, num_bytes: float, share: float = 0.5) -> None:
    """ValueError (one line) when ``what`` needs more than ``share`` of the machine's memory."""
    limit = share * physical_memory()
    if num_bytes > limit:
        raise ValueError(
            f"{what} would need about {num_bytes / 2**30:,.1f} GiB, more than "
            f"{limit / 2**30:,.1f} GiB ({share:.0%} of this machine's memory)"
        )
