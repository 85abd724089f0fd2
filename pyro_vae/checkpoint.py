"""Self-describing checkpoints: plain config and tensors, atomic writes, no pickled code."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .model import VAE, VAEConfig

__all__ = [
    "export_model",
    "load_pretrained",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "load_weights",
    "read_payload",
    "save_checkpoint",
]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe or of another format version."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash at any instant leaves either the old file or the new one, never a torn file.
    Failing writes (no space, a file-size limit, a read-only folder) raise ``OSError`` naming
    the file and the cause in one line; the old file stays.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        # O_EXCL: a fresh file; mode 0666 minus the umask, as an ordinary open() gives
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _write_error(path: Path, error: OSError) -> OSError:
    """``cannot write PATH: REASON`` in one line, keeping the errno."""
    failure = OSError(f"cannot write {path}: {error.strerror or error}")
    failure.errno = error.errno
    return failure


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable where the platform allows opening folders (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, vae: VAE, **extra: Any) -> None:
    """Save config and state dict (plus plain ``extra`` values such as epoch) atomically."""
    if not isinstance(vae, VAE):
        raise TypeError(f"vae must be a VAE, got {type(vae).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "config": vae.config.to_dict(),
        "name": vae.prefix,
        "state_dict": vae.state_dict(),
        **extra,
    }
    buffer = io.BytesIO()  # serialized first: a failing write is then an OSError naming why
    torch.save(payload, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def read_payload(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict stored at ``path``, read safely and checked for this format version.

    Only tensors and plain containers are read (``weights_only=True``): a file whose pickle
    would import or run code is refused with :class:`CheckpointError` and nothing of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # a foreign pickle is refused below; no torch warning
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(_unpickling_message(path, str(error))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path}: not a pyro_vae checkpoint")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']!r}; this "
            f"pyro_vae reads format {FORMAT_VERSION}"
        )
    return payload


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the VAE stored at ``path``; returns it (in eval mode) and the whole payload.

    Only tensors and plain containers are read (``weights_only=True``): a file whose pickle
    would import or run code is refused with :class:`CheckpointError`.
    """
    payload = read_payload(path, map_location)
    try:
        vae = VAE(VAEConfig.from_dict(payload["config"]), name=payload.get("name", "vae"))
        vae.load_state_dict(payload["state_dict"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: inconsistent checkpoint ({first})") from None
    return vae.to(map_location).eval(), payload


def load_weights(vae: VAE, path: str | Path) -> dict[str, Any]:
    """Copy the weights of the checkpoint at ``path`` into ``vae`` (to start training from
    them); the stored model settings must equal ``vae.config``. Returns the payload
    (``epoch``, ``valid_elbo``, ...); raises :class:`CheckpointError` naming the settings
    that differ."""
    stored, payload = load_checkpoint(path)
    pairs = [
        (f.name, getattr(stored.config, f.name), getattr(vae.config, f.name))
        for f in fields(VAEConfig)
    ]
    names = {name for name, old, new in pairs if old != new}
    if {"latent_dim", "latent_dims"} <= names:  # latent_dim is latent_dims[0]: name one
        one_layer = len(stored.config.latent_dims) == len(vae.config.latent_dims) == 1
        names.discard("latent_dims" if one_layer else "latent_dim")
    differ = [f"{name} {old!r} there, {new!r} here" for name, old, new in pairs if name in names]
    if differ:
        raise CheckpointError(
            f"{path}: its model differs ({'; '.join(differ)}); build the model from its "
            "settings (pyro-vae train --config RUN_DIR/config.json)"
        )
    vae.load_state_dict(stored.state_dict())
    return payload


def _unpickling_message(path: Path, text: str) -> str:
    """One line for a refused pickle: what it tried to load, never advice to disable safety."""
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match is None:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported" in line), "bad pickle")
        return (
            f"{path}: refused to load, not a checkpoint of plain tensors and values "
            f"({detail.rstrip('.')})"
        )
    return (
        f"{path}: refused to load, it holds more than tensors and plain values: unpickling "
        f"it would import {match.group(1)!r}"
    )


# ---------------------------------------------------------------- sharing

#: Files of an exported model: its weights and the config that rebuilds it.
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"


def export_model(vae: VAE, out_dir: str | Path) -> list[Path]:
    """Write ``model.safetensors`` (the weights) and ``config.json`` (the model) to ``out_dir``.

    The ``safetensors`` format holds tensors only, so loading it runs no code; the folder is
    what :func:`load_pretrained` and ``VAE.from_pretrained`` read.
    """
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "format": "pyro_vae",
        "format_version": FORMAT_VERSION,
        "model": vae.config.to_dict(),
        "name": vae.prefix,
    }
    weights = out_dir / EXPORT_WEIGHTS
    tensors = {key: value.detach().cpu().contiguous() for key, value in vae.state_dict().items()}
    atomic_write(weights, lambda tmp: tmp.write_bytes(save(tensors)))
    config = out_dir / EXPORT_CONFIG
    atomic_write(config, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return [weights, config]


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> VAE:
    """The VAE of an exported folder (:func:`export_model`) or of a run folder (its
    best-validation ``checkpoint.pt``), in eval mode; CheckpointError (one line) otherwise."""
    from .run_dir import RunDir  # the run folder's layout (which imports this module)

    path = Path(path)
    run = RunDir(path)
    if run.checkpoint.is_file() and not (path / EXPORT_WEIGHTS).is_file():
        return load_checkpoint(run.checkpoint, map_location)[0]
    weights, config = path / EXPORT_WEIGHTS, path / EXPORT_CONFIG
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(
            f"{path}: neither an exported model ({EXPORT_WEIGHTS}, {EXPORT_CONFIG}) nor a run "
            "folder (checkpoint.pt)"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        record = json.loads(config.read_text())
        if record.get("format") != "pyro_vae" or record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {record.get('format')!r} {record.get('format_version')!r}")
        vae = VAE(VAEConfig.from_dict(record["model"]), name=record.get("name", "vae"))
        vae.load_state_dict(load(weights.read_bytes()))
    except (SafetensorError, AttributeError, KeyError, OSError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a loadable exported model ({first})") from None
    return vae.to(map_location).eval()
