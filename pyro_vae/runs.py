"""The run folder: its files, the record in ``config.json`` (what it holds, reading it back,
the train options that rebuild its run), its pictures and evaluation results."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

from . import __version__
from .checkpoint import load_checkpoint
from .data import DataSpec, load_dataset
from .evaluate import evaluate, layer_active_units
from .model import VAE, VAEConfig
from .pictures import save_image_grid
from .run_dir import (
    CHECKPOINT_FILES,
    RunDir,
    RunError,
    best_index,
    read_config_file,
    write_json,
)
from .run_folder import RunFolder
from .train import TrainConfig, one_hot_labels

__all__ = [
    "CONFIG",
    "RUN_FILES",
    "Run",
    "RunError",
    "discard_unstarted",
    "load_run",
    "prepare_run_dir",
    "restarted_run",
    "run_folder",
    "run_outputs",
    "set_aside_old_run",
    "read_config_file",
    "read_run",
    "record_evaluation",
    "run_record",
    "save_run_pictures",
    "summarize_run",
    "evaluate_run",
    "format_evaluation",
    "format_runs",
    "stored_data_spec",
    "train_options",
    "write_json",
]

CONFIG = RunDir.CONFIG

#: ``pyro-vae train`` destinations of the TrainConfig fields (the rest share their name).
_TRAIN_FLAGS = {"num_epochs": "epochs"}
#: VAEConfig fields whose options are KEY=VALUE pairs on the command line.
_OPTION_FIELDS = ("guide", "prior", "likelihood", "arch")


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
        **launch_record(),
    }


def launch_record() -> dict[str, Any]:
    """``{"launch": {"run_id", "world_size"}}`` under torchrun (the job's rendezvous id,
    the same for every restart of it), else ``{}``."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return {}
    return {"launch": {"run_id": run_id, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}}


def restarted_run(run_dir: Path) -> str | None:
    """What a worker restarted by torchrun (``--max-restarts``) does with ``run_dir``:
    ``"resume"`` when its own job's earlier attempt completed an epoch there, ``"replace"``
    when that attempt completed none, None when the folder is not this job's (or this is
    the first attempt)."""
    if not int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0):
        return None
    folder = RunDir(run_dir)
    try:
        record = json.loads(folder.config.read_text())
        launched = record["launch"]["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if launched != os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    return "resume" if folder.last.is_file() else "replace"


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
        where = RunDir(run_dir).config
        raise RunError(f"{where}: not a usable run configuration ({error})") from None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The record in ``run_dir/config.json``; RunError (one line) when missing or malformed."""
    return RunDir(run_dir).read_record()


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
    return key in ("version", "versions", "command", "started", "launch", "init_checkpoint")


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


# ---------------------------------------------------------------- the run folder

#: Files a run folder may hold; an existing run is recognized by any of them.
RUN_FILES = RunDir.FILES


def prepare_run_dir(
    out: Path | None, data: DataSpec, guide: str, overwrite: bool, write: bool = True
) -> tuple[Path, bool]:
    """The run folder and whether it is new (created when its lock is taken).

    ``out`` defaults to ``runs/DATA-GUIDE``. With ``write=False`` (a process other than rank
    0) nothing is checked. RunError when it holds a run and not ``overwrite``.
    """
    run_dir = out or Path("runs") / f"{data.name}-{guide}"
    if not write:  # another process owns the folder
        return run_dir, False
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir}: exists and is not a folder")
    _refuse_existing_run(run_dir, overwrite)
    return run_dir, not run_dir.exists()


def _refuse_existing_run(run_dir: Path, overwrite: bool) -> list[str]:
    """The run files in ``run_dir``; RunError when there are some and not ``overwrite``."""
    existing = RunDir(run_dir).existing()
    if existing and not overwrite:
        raise RunError(
            f"--out {run_dir}: already holds a run ({', '.join(existing)}); pass "
            f"--resume {run_dir} to continue it, --overwrite to replace it, or another --out"
        )
    return existing


def run_outputs(run_dir: Path) -> list[Path]:
    """What pyro-vae wrote in a run folder: ``RUN_FILES``, sample grids, TensorBoard files
    and unfinished temporary files; other files in the folder are not the run's."""
    return RunDir(run_dir).outputs()


def run_folder(run_dir: Path) -> RunFolder:
    """The run folder ``run_dir`` with its lock; ``--overwrite`` moves only its outputs."""
    return RunFolder(run_dir, run_outputs)


def set_aside_old_run(folder: RunFolder, overwrite: bool) -> None:
    """Under the folder's lock: keep an old run aside (``--overwrite``) until the new run's
    first epoch; RunError when there is one and not ``overwrite``."""
    if _refuse_existing_run(folder.path, overwrite):
        folder.set_aside()


def discard_unstarted(run_dir: Path) -> None:
    """Remove what a run wrote before its first epoch ended, so no empty run is left behind."""
    RunDir(run_dir).discard_unstarted()


def stored_data_spec(run_dir: Path, record: dict[str, Any]) -> DataSpec:
    """The DataSpec a run's record holds (RunError, one line, when it holds none)."""
    where = RunDir(run_dir).config
    if not isinstance(record.get("data"), dict):
        raise RunError(f"{where}: records no dataset to take images from")
    try:
        return DataSpec(**record["data"])
    except TypeError as error:
        raise RunError(f"{where}: not a usable data record ({error})") from None


def record_evaluation(run_dir: Path, record: dict[str, Any]) -> Path:
    """Keep an evaluation ``record`` in ``run_dir/eval.json`` under its split (others stay)."""
    return RunDir(run_dir).record_evaluation(record)


def save_run_pictures(
    vae: VAE, valid: Tensor, run_dir: Path, condition: Tensor | None = None
) -> list[Path]:
    """samples.png (64 prior samples) and reconstructions.png (data rows above their decodings).

    Means are shown on the likelihood's value range, or on the data's range when unbounded.
    A conditional VAE's samples take one column per class; ``condition`` conditions the
    reconstructions of ``valid`` ``(N, P)``.
    """
    shape = vae.config.image_shape
    span = vae.likelihood.value_range() or (float(valid.min()), float(valid.max()))
    width = vae.config.condition_dim
    num_samples = 64 if not width else width * max(1, 64 // width)
    generator = torch.Generator().manual_seed(0)
    samples = vae.sample_images(num_samples, generator, vae.class_cycle(num_samples)).cpu()
    columns = min(8, valid.shape[0])
    n = columns * min(4, valid.shape[0] // columns)
    x, c = valid[:n], None if condition is None else condition[:n]
    rows = torch.stack([x, vae.reconstruct(x, c)]).reshape(2, -1, columns, x.shape[-1])
    pairs = rows.transpose(0, 1).reshape(-1, columns, x.shape[-1])  # data row, then its decoding
    kind = f"{vae.likelihood.key} means"
    per_class = ", one column per class" if width else ""
    labels = ["data", "reconstruction"] * (pairs.shape[0] // 2)
    return [
        save_image_grid(
            RunDir(run_dir).file(RunDir.SAMPLES), samples, shape, width or None, value_range=span,
            title=f"{num_samples} images from the prior ({kind}{per_class})",
        ),
        save_image_grid(
            RunDir(run_dir).file(RunDir.RECONSTRUCTIONS), pairs.cpu(), shape, value_range=span,
            title=f"validation images and their reconstructions ({kind})", row_labels=labels,
        ),
    ]  # fmt: skip


# ---------------------------------------------------------------- evaluation


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    num_samples: int = 5000,
    batch_size: int = 100,
    num_points: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    data: DataSpec | None = None,
    progress: bool = False,
    checkpoint: str = "best",
) -> tuple[dict[str, Any], Path | None]:
    """Evaluate a model of a run folder on ``split`` (the first ``num_points`` images): IS
    log p(x) with ``num_samples`` draws, ELBO, KL, per-layer active units.

    ``checkpoint`` is ``best`` (``checkpoint.pt``, the best validation epoch) or ``last``
    (``last.pt``, the latest epoch); the record names it and its ``epoch``. ``data`` evaluates
    on other images of the same shape; without it the run's own data are used and the record
    is kept in ``eval.json``. Returns the record and that file (or None).
    """
    if checkpoint not in CHECKPOINT_FILES:
        raise ValueError(
            f"checkpoint must be one of {sorted(CHECKPOINT_FILES)}, got {checkpoint!r}"
        )
    folder = RunDir(run_dir)
    record = folder.read_record()
    path = folder.path / CHECKPOINT_FILES[checkpoint]
    vae, payload = load_checkpoint(path, map_location=device)
    images = load_dataset(data or stored_data_spec(folder.path, record))
    x = images.split(split)[:num_points]
    if x.shape[1] != vae.config.data_dim:
        raise ValueError(
            f"the data has {x.shape[1]} pixels per image but the checkpoint "
            f"expects {vae.config.data_dim}"
        )
    condition = one_hot_labels(vae, images, split)
    condition = None if condition is None else condition[:num_points].to(device)
    pyro.set_rng_seed(seed)
    x = x.to(device)
    result = evaluate(
        vae, x, num_samples=num_samples, batch_size=batch_size, condition=condition,
        progress=progress,
    )  # fmt: skip
    out: dict[str, Any] = {
        **result.to_dict(), "split": split, "checkpoint": checkpoint, "epoch": payload.get("epoch")
    }  # fmt: skip
    if not vae.likelihood.discrete:
        out["density"] = True  # log densities: not comparable with discrete log probabilities
    if len(vae.latent_sites) > 1:
        out["layer_active_units"] = layer_active_units(vae, x)
    written = folder.record_evaluation(out) if data is None else None
    return out, written


def format_evaluation(record: dict[str, Any]) -> str:
    """The lines ``pyro-vae evaluate`` prints for an :func:`evaluate_run` record."""
    lines = [
        f"{record['split']} split, {record['num_points']} images, K = {record['num_samples']} "
        "importance samples (nats per image)"
    ]
    if "checkpoint" in record:
        name = CHECKPOINT_FILES[record["checkpoint"]]
        lines.append(f"  model of {name} (epoch {record['epoch']})")
    if record.get("density"):
        lines.append(
            "  the likelihood is a density: these are log densities, "
            "not comparable with log probabilities of discrete data"
        )
    layers = [(f"  KL of layer {name}", v) for name, v in record.get("layer_kl", {}).items()]
    for label, value in (
        ("ELBO", record["elbo"]),
        ("reconstruction E_q log p(x|z)", record["reconstruction"]),
        ("KL(q(z|x) || p(z))", record["kl"]),
        *layers,
        ("IS log p(x)", record["log_likelihood"]),
        ("gap log p(x) - ELBO", record["gap"]),
    ):
        lines.append(f"  {label:<32}{value:10.3f}")
    for name, count in record.get("layer_active_units", {}).items():
        lines.append(f"  {'active units of layer ' + name:<32}{count:6d}")
    return "\n".join(lines)


# ---------------------------------------------------------------- summaries


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One row about a run folder: its settings, progress and evaluation results (if any).

    Keys: ``run``, ``data``, ``model`` (one line: layers, guide, prior, likelihood, arch),
    ``epochs``, ``best_epoch`` (the epoch of ``checkpoint.pt``: best valid ELBO, or best valid
    IWAE bound for a run trained with it), ``best_valid_elbo`` (the valid ELBO then),
    ``last_train_elbo``, and from ``eval.json`` the latest split's ``split``,
    ``log_likelihood``, ``elbo``, ``gap``.
    """
    folder = RunDir(run_dir)
    record = folder.read_record()
    model, data = record.get("model", {}), record.get("data", {})
    sizes = model.get("latent_dims") or [model.get("latent_dim")]
    row: dict[str, Any] = {
        "run": str(folder.path),
        "data": data.get("name", "?"),
        "model": (
            f"z {','.join(map(str, sizes))}"
            + (f" {model.get('inference')}" if len(sizes) > 1 else "")
            + f", {model.get('guide')}, {model.get('prior')} prior, "
            f"{model.get('likelihood', 'bernoulli')}, {model.get('arch')}"
        ),
    }
    try:
        metrics = folder.read_metrics()
    except (OSError, ValueError, KeyError):
        metrics = None
    if metrics is not None:
        best = best_index(metrics)
        row["epochs"] = int(metrics["epoch"][-1])
        row["best_epoch"] = int(metrics["epoch"][best])
        row["best_valid_elbo"] = metrics["valid_elbo"][best]
        row["last_train_elbo"] = metrics["train_elbo"][-1]
    evaluations = folder.read_evaluations()
    if evaluations:
        split = "test" if "test" in evaluations else sorted(evaluations)[0]
        result = evaluations[split]
        if isinstance(result, dict):
            row["split"] = split
            row.update({k: result.get(k) for k in ("log_likelihood", "elbo", "gap")})
    return row


def format_runs(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize_run` rows (blank cells for what a run lacks)."""
    columns = (
        ("run", "run", "{}"),
        ("data", "data", "{}"),
        ("model", "model", "{}"),
        ("epochs", "epochs", "{}"),
        ("best_epoch", "best epoch", "{}"),
        ("best_valid_elbo", "best valid ELBO", "{:.3f}"),
        ("split", "evaluated", "{}"),
        ("log_likelihood", "IS log p(x)", "{:.3f}"),
        ("gap", "gap", "{:.3f}"),
    )
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = ["" if row.get(key) is None else form.format(row[key]) for key, _, form in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
