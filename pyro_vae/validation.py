"""Argument checks shared by constructors and configs, and the registries' decorator."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "check_images",
    "check_instance",
    "check_key",
    "check_memory",
    "check_positive_int",
    "check_seed",
    "check_work",
    "physical_memory",
    "registrar",
]

#: Seeds reach Python's, NumPy's and torch's generators; NumPy takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1
#: The arithmetic rate an evaluation's time estimate assumes: generous for a CPU, so only
#: work that would take far too long anywhere is refused.
ASSUMED_FLOPS = 1e12
#: The longest evaluation accepted without question, in seconds (a week at ASSUMED_FLOPS).
MAX_WORK_SECONDS = 7 * 24 * 3600.0

_C = TypeVar("_C", bound=type)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (bools refused); otherwise a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """``value`` if it is an int in 0 .. 2**32 - 1; otherwise a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        shown = repr(value) if len(repr(value)) < 40 else f"{repr(value)[:37]}..."
        raise ValueError(f"{name} must be an integer from 0 to {MAX_SEED}, got {shown}")
    return value


def check_instance(name: str, value: Any, kind: type | tuple[type, ...], hint: str = "") -> Any:
    """``value`` if it is a ``kind``; otherwise a TypeError naming the argument and its type."""
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise TypeError(
            f"{name} must be a {expected}, got {type(value).__name__}"
            + (f"; {hint}" if hint else "")
        )
    return value


def check_images(name: str, x: Any, width: int, what: str = "P", flat: bool = False) -> None:
    """TypeError/ValueError unless x is a floating-point tensor ``(*, B, width)`` (``(B,
    width)`` when ``flat``)."""
    check_instance(name, x, torch.Tensor, f"use torch.as_tensor({name}, dtype=torch.float32)")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must hold floating-point values, got {x.dtype}; use {name}.float()"
        )
    if x.dim() < 2 or x.shape[-1] != width or (flat and x.dim() != 2):
        shape = f"(B, {width})" if flat else f"(*, B, {width})"
        raise ValueError(
            f"{name} must have shape {shape} ({what} = {width}), got {tuple(x.shape)}"
        )


def check_work(what: str, flops: float) -> None:
    """ValueError (one line) when ``flops`` operations would take more than a week even at
    ``ASSUMED_FLOPS`` per second."""
    seconds = flops / ASSUMED_FLOPS
    if seconds > MAX_WORK_SECONDS:
        raise ValueError(
            f"{what} would take about {seconds / 86400:,.0f} days even at "
            f"{ASSUMED_FLOPS:.0e} operations per second (about {flops:.1e} operations)"
        )


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
