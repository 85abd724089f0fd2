"""The run record (``config.json``): what it holds, reading it back, and the train options
that rebuild its run."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyro
import torch

from . import __version__
from .data import DataSpec
from .model import VAE, VAEConfig
from .train import TrainConfig

__all__ = [
    "CONFIG",
    "Run",
    "RunError",
    "load_run",
    "read_config_file",
    "read_run",
    "run_record",
    "train_options",
]

CONFIG = "config.json"

#: ``pyro-vae train`` destinations of the TrainConfig fields (the rest share their name).
_TRAIN_FLAGS = {"num_epochs": "epochs"}
#: VAEConfig fields whose options are KEY=VALUE pairs on the command line.
_OPTION_FIELDS = ("guide", "prior", "likelihood", "arch")


class RunError(ValueError):
    """A run folder or config file that cannot be used; the message names the file."""


def run_record(
    model: VAEConfig,
    train: TrainConfig,
    data: DataSpec,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What ``config.json`` holds: the three configs, the command line, versions and time."""
    return {
        "version": __version__,
        "model": model.to_dict(),
        "train": asdict(train),
        "data": asdict(data),
        "command": None if command is None else ["pyro-vae", *command],
        "versions": {
            "pyro_vae": __version__,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "python": platform.python_version(),
        },
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Run:
    """A run's settings, read back from its ``config.json`` (:func:`load_run`).

    ``build()`` gives the untrained VAE as ``pyro-vae train`` built it, so that
    ``fit(run.build(), load_dataset(run.data), run.train)`` repeats the run: bit for bit on
    the CPU, one process.
    """

    model: VAEConfig
    train: TrainConfig
    data: DataSpec
    record: dict[str, Any]

    def build(self, name: str = "vae") -> VAE:
        """The VAE with the CLI's initial weights; seeds Pyro's RNGs like the CLI does.

        The CLI calls ``pyro.set_rng_seed(seed)`` before building the model and again after
        it (so training draws do not depend on the model's size); this does the same.
        """
        pyro.set_rng_seed(self.train.seed)
        vae = VAE(self.model, name=name)
        pyro.set_rng_seed(self.train.seed)
        return vae


def load_run(run_dir: str | Path) -> Run:
    """The model, training and data settings of the run in ``run_dir`` (RunError if unusable)."""
    record = read_run(run_dir)
    try:
        return Run(
            VAEConfig.from_dict(record["model"]),
            TrainConfig(**record["train"]),
            DataSpec(**record["data"]),
            record,
        )
    except (KeyError, TypeError, ValueError) as error:
        where = Path(run_dir) / CONFIG
        raise RunError(f"{where}: not a usable run configuration ({error})") from None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The record in ``run_dir/config.json``; RunError (one line) when missing or malformed."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunError(
            f"{run_dir}: not a run folder (no {CONFIG}); train one with "
            "pyro-vae train --out RUN_DIR"
        )
    return read_config_file(path)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML (``.toml``) file holding one table; RunError (one line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: cannot read ({error})") from None
    try:
        if path.suffix.lower() == ".toml":
            values = _toml(text)
        else:
            values = json.loads(text)
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
            raise RunError("reading TOML needs Python >= 3.11 or: pip install tomli") from None
    return tomllib.loads(text)


def train_options(record: dict[str, Any], where: str = CONFIG) -> dict[str, Any]:
    """The ``pyro-vae train`` option values (parser destinations) that rebuild a run.

    ``record`` is a run's ``config.json``, or a file of the same shape with any of its
    ``model``, ``train`` and ``data`` tables, each holding any of its fields; top-level keys
    that are not tables are taken as option names (``latent_dims``, ``kl_warmup``, ...).
    Unknown fields are an error naming ``where``.
    """
    tables = {name: record.get(name) or {} for name in ("model", "train", "data")}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise RunError(f"{where}: {name!r} must be a table, got {type(table).__name__}")
    flat = {k: v for k, v in record.items() if k not in tables and not _is_metadata(k)}
    options = {**_model_options(tables["model"], where), **_train_flags(tables["train"], where)}
    options.update(_data_options(tables["data"], where))
    options.update(flat)
    return options


def _is_metadata(key: str) -> bool:
    return key in ("version", "versions", "command", "started")


def _model_options(model: dict[str, Any], where: str) -> dict[str, Any]:
    _check_fields(model, VAEConfig, where, "model", ignore=("data_dim", "image_shape"))
    options: dict[str, Any] = {}
    for key, value in model.items():
        if key in ("data_dim", "image_shape"):
            continue  # both come from the data
        if key.endswith("_options") and key[: -len("_options")] in _OPTION_FIELDS:
            options[key[: -len("options")] + "option"] = list(dict(value).items())
        elif key == "condition_dim":
            options["conditional"] = bool(value)
        elif key == "latent_dims":
            options[key] = tuple(value) if value is not None and len(value) > 1 else None
        elif key == "layer_guides":  # kept unless every layer takes the model's guide
            same = value is None or set(value) <= {model.get("guide", "full")}
            options[key] = None if same else tuple(value)
        elif key == "hidden_dims":
            options[key] = tuple(value)
        else:
            options[key] = value
    return options


def _train_flags(train: dict[str, Any], where: str) -> dict[str, Any]:
    _check_fields(train, TrainConfig, where, "train", ignore=("log_every",))
    return {
        _TRAIN_FLAGS.get(key, key): value for key, value in train.items() if key != "log_every"
    }


def _data_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    _check_fields(data, DataSpec, where, "data", ignore=("seed", "pixels"))
    options: dict[str, Any] = {}
    if "name" in data:
        path = data.get("path")
        options["data"] = [data["name"]] if path is None else [data["name"], path]
    if "binarize" in data:
        options["binarize"] = data["binarize"]
    return options


def _check_fields(
    table: dict[str, Any], cls: type, where: str, name: str, ignore: Sequence[str] = ()
) -> None:
    unknown = sorted(set(table) - set(cls.__dataclass_fields__) - set(ignore))
    if unknown:
        raise RunError(f"{where}: unknown {name} fields {unknown}")
