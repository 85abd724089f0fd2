"""Values of the pyro-vae command line: argument types, the usage error, help formatting."""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from ..guides import GUIDES, FlowGuide
from ..validation import MAX_SEED


#: train flags that ``--resume`` accepts; every other setting comes from the run's config.json.
class UsageError(ValueError):
    """Bad command-line input; reported in one line with exit status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is empty (None, [], False) or its help names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, [], False):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _flow_guides() -> list[str]:
    return sorted(key for key, cls in GUIDES.items() if issubclass(cls, FlowGuide))


def _objective(name: str) -> str:
    return "elbo" if name == "trace" else name


# ---------------------------------------------------------------- argument types


def _integer_at_least(text: str, minimum: int) -> int:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer_at_least(text, 1)


def _seed(text: str) -> int:
    value = _integer_at_least(text, 0)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, got {text!r}")
    return value


def _count(text: str) -> int:
    return _integer_at_least(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip().lower() in ("0", "0.0"):
        return 0.0
    return _positive_float(text)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 400 or 400,200, got {text!r}"
        ) from None


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.replace("-", "_"), raw


def _seeds(text: str) -> int | tuple[int, ...]:
    """``3`` (seeds 0, 1, 2) or ``0,4,7`` (those seeds; ``7,`` the one seed 7)."""
    if "," not in text:
        return _positive_int(text)
    try:
        return tuple(_seed(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seeds or comma-separated seeds >= 0, got {text!r}"
        ) from None


def _guide_list(text: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [key for key in keys if key not in GUIDES]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown guide(s) {','.join(unknown) or text!r}; "
            f"choose from {','.join(sorted(GUIDES))}"
        )
    return keys
