"""The layout of a run folder: the name of every file a run writes, and how each is read and
written. Training, resuming, evaluation, summaries and the commands reach a run's files only
through :class:`RunDir`."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, atomic_write, read_payload

__all__ = [
    "RunDir",
    "RunError",
    "best_index",
    "read_config_file",
    "selection_column",
    "write_json",
    "write_metrics",
]


class RunError(ValueError):
    """A run folder or config file that cannot be used; the message names the file."""


class RunDir:
    """One run folder and its files.

    ``config.json`` records the settings (:meth:`read_record`), ``metrics.csv`` one row per
    epoch, ``checkpoint.pt`` the best model, ``last.pt`` the whole training state of the last
    completed epoch, ``eval.json`` the evaluation of each split; pictures and TensorBoard
    files sit beside them.

    Args:
        path: The folder (it need not exist yet).
    """

    CONFIG = "config.json"
    CHECKPOINT = "checkpoint.pt"
    LAST = "last.pt"
    METRICS = "metrics.csv"
    EVALUATIONS = "eval.json"
    CURVES = "curves.png"
    SAMPLES = "samples.png"
    RECONSTRUCTIONS = "reconstructions.png"
    GAPS = "gaps.json"
    LATENT = "latent.png"
    INTERPOLATION = "interpolation.png"
    TRAVERSAL = "traversal.png"
    TENSORBOARD = "tensorboard"
    #: Files a run folder may hold; an existing run is recognized by any of them.
    FILES = (
        CONFIG,
        CHECKPOINT,
        LAST,
        METRICS,
        SAMPLES,
        RECONSTRUCTIONS,
        CURVES,
        EVALUATIONS,
        GAPS,
        LATENT,
        INTERPOLATION,
        TRAVERSAL,
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of ``name`` in this folder, e.g. ``run.file(RunDir.SAMPLES)``."""
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def evaluations(self) -> Path:
        return self.path / self.EVALUATIONS

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    # ------------------------------------------------------------ what the folder holds

    def existing(self) -> list[str]:
        """The names of :attr:`FILES` present (empty: no run here)."""
        return [name for name in self.FILES if (self.path / name).exists()]

    def outputs(self) -> list[Path]:
        """What pyro-vae wrote here: :attr:`FILES`, sample grids, TensorBoard files and
        unfinished temporary files; other files in the folder are not the run's."""
        names = [*self.FILES, self.TENSORBOARD]
        found = [self.path / name for name in names if (self.path / name).exists()]
        return found + sorted(self.path.glob("samples-*.png")) + sorted(self.path.glob(".*.tmp"))

    def saved_epoch(self) -> int | None:
        """The epoch ``last.pt`` holds; None when there is none or it cannot be read."""
        try:
            return int(read_payload(self.last)["epoch"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            return None

    def discard_unstarted(self) -> None:
        """Remove what a run wrote before its first epoch ended (no ``last.pt`` yet)."""
        if self.last.exists():
            return
        for path in (self.config, self.metrics):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ reading and writing

    def read_record(self) -> dict[str, Any]:
        """The record in ``config.json``; RunError (one line) when missing or malformed."""
        if not self.config.is_file():
            raise RunError(
                f"{self.path}: not a run folder (no {self.CONFIG}); train one with "
                "pyro-vae train --out RUN_DIR"
            )
        return read_config_file(self.config)

    def write_record(self, record: dict[str, Any]) -> None:
        """Write ``config.json`` atomically."""
        write_json(self.config, record)

    def read_metrics(self) -> dict[str, list[float]]:
        """Columns ``epoch``, ``train_elbo``, ``valid_elbo`` (and ``valid_bound``, in a run
        trained with the IWAE bound, when every epoch has it) of ``metrics.csv``."""
        if not self.metrics.is_file():
            raise FileNotFoundError(f"{self.metrics}: no such file (not a run folder?)")
        with open(self.metrics, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"{self.metrics}: no epochs recorded yet")
        keys = ("epoch", "train_elbo", "valid_elbo")
        columns = {key: [float(row[key]) for row in rows] for key in keys}
        if all(row.get("valid_bound") for row in rows):
            columns["valid_bound"] = [float(row["valid_bound"]) for row in rows]
        return columns

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Atomically (re)write ``metrics.csv`` with one row per epoch of ``history``."""
        write_metrics(self.metrics, history)

    def read_evaluations(self) -> dict[str, Any]:
        """``eval.json``: the latest evaluation of each split (empty when none is readable)."""
        try:
            stored = json.loads(self.evaluations.read_text())
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def record_evaluation(self, record: dict[str, Any]) -> Path:
        """Keep an evaluation ``record`` in ``eval.json`` under its split, or ``SPLIT-last``
        for the model of ``last.pt`` (others stay)."""
        stored = self.read_evaluations()
        last = record.get("checkpoint") == "last"
        stored[f"{record['split']}-last" if last else record["split"]] = record
        write_json(self.evaluations, stored)
        return self.evaluations


#: The model files of a run by ``pyro-vae evaluate --checkpoint`` name.
CHECKPOINT_FILES = {"best": RunDir.CHECKPOINT, "last": RunDir.LAST}


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def selection_column(metrics: Mapping[str, Any]) -> str:
    """The metric that picks the best epoch (checkpoint and patience) of a metrics row or of
    :meth:`RunDir.read_metrics` columns: ``valid_bound`` in a run trained with the IWAE
    bound, else ``valid_elbo``."""
    return "valid_bound" if "valid_bound" in metrics else "valid_elbo"


def best_index(metrics: dict[str, list[float]]) -> int:
    """Position, in :meth:`RunDir.read_metrics` columns, of the epoch ``checkpoint.pt``
    holds (the best of :func:`selection_column`)."""
    selected = metrics[selection_column(metrics)]
    return max(range(len(selected)), key=selected.__getitem__)


def write_metrics(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Atomically (re)write a ``metrics.csv`` at ``path`` with one row per epoch."""
    fields = list(dict.fromkeys(key for row in history for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(Path(path), write)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML (``.toml``) file holding one table; RunError (one line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: cannot read ({error})") from None
    try:
        values = _toml(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except ValueError as error:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise RunError(f"{path}: not valid {kind} ({error})") from None
    if not isinstance(values, dict):
        raise RunError(f"{path}: expected a table of settings, got {type(values).__name__}")
    return values


def _toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise RunError("reading TOML needs Python >= 3.11 or the tomli package") from None
    return tomllib.loads(text)
