"""Resumable training state: model, optimizer, random streams and progress in ``last.pt``."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch

from .checkpoint import CheckpointError, read_payload, save_checkpoint
from .model import VAE
from .run_dir import RunDir

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = [
    "LAST",
    "RESUME_KEYS",
    "Progress",
    "get_rng_state",
    "load_training_state",
    "save_training_state",
    "set_rng_state",
]

LAST = RunDir.LAST
#: TrainConfig fields that must be unchanged for a resumed run to continue the same run.
RESUME_KEYS = ("batch_size", "num_particles", "seed")


@dataclass
class Progress:
    """Where a run stands after its last completed epoch (0: none yet)."""

    epoch: int = 0
    best_valid_elbo: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def get_rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream training draws from, as tensors and plain values only.

    ``torch`` (and ``cuda``) drive Pyro's sampling, initialization and dynamic binarization,
    ``order`` is the minibatch-order generator; ``python`` and ``numpy`` complete Pyro's own
    RNG state (what ``pyro.util.get_rng_state`` covers).
    """
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "order": generator.get_state(),
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`get_rng_state`: restore every stream (CUDA ones where devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["order"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    key = npy["key"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["name"], key, npy["pos"], npy["has_gauss"], npy["cached"]))
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def save_training_state(
    path: str | Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    train_config: TrainConfig,
    progress: Progress,
    rank_states: list[dict[str, Any]] | None = None,
) -> None:
    """Atomically write everything needed to continue training after ``progress.epoch``.

    The file is also a regular checkpoint (:func:`~pyro_vae.checkpoint.load_checkpoint` reads
    it) and holds tensors and plain values only. ``rank_states`` (several processes): each
    rank's :func:`get_rng_state`, by rank, stored as ``rng_by_rank``.
    """
    extra = {} if rank_states is None else {"rng_by_rank": list(rank_states)}
    save_checkpoint(
        path,
        vae,
        epoch=progress.epoch,
        valid_elbo=progress.history[-1]["valid_elbo"] if progress.history else None,
        train_config=asdict(train_config),
        optimizer=optimizer.state_dict(),
        rng=get_rng_state(generator),
        best_valid_elbo=progress.best_valid_elbo,
        best_epoch=progress.best_epoch,
        history=[dict(row) for row in progress.history],
        **extra,
    )


def load_training_state(
    path: str | Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    train_config: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
) -> Progress:
    """Restore ``vae``, ``optimizer``, ``generator`` and the global RNGs from ``path``.

    Process ``rank`` of ``world_size`` takes its own random streams when the run was saved
    by as many processes. With another number of processes the shards differ anyway: the
    minibatch-order generator continues, and the global streams are reseeded from the seed,
    the epoch and the rank (reproducible, but not the streams of an uninterrupted run).

    Raises:
        CheckpointError: the file is missing, unsafe, of another format or incomplete.
        ValueError: the stored model or the fields ``RESUME_KEYS`` differ from the given ones.
    """
    payload = read_payload(path)  # RNG states must stay on the CPU
    stored_model, model = payload.get("config"), vae.config.to_dict()
    if stored_model != model:
        if not isinstance(stored_model, dict):
            raise ValueError(f"{path}: holds no model configuration")
        differ = [key for key in model if stored_model.get(key) != model[key]]
        differ += [key for key in stored_model if key not in model]
        shown = ", ".join(
            f"{key} {stored_model.get(key)!r} (expected {model.get(key)!r})" for key in differ[:3]
        )
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ValueError(f"{path}: holds another model: {shown[:300]}{more}")
    stored, given = payload.get("train_config") or {}, asdict(train_config)
    changed = [key for key in RESUME_KEYS if stored.get(key) != given[key]]
    if changed:
        detail = ", ".join(f"{key} {given[key]!r} (run: {stored.get(key)!r})" for key in changed)
        raise ValueError(
            f"cannot resume {path} with {detail}: {', '.join(RESUME_KEYS)} must stay the same"
        )
    try:
        vae.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        by_rank = payload.get("rng_by_rank")
        saved_world = len(by_rank) if by_rank else 1
        if saved_world == world_size:
            set_rng_state(by_rank[rank] if by_rank else payload["rng"], generator)
        else:
            generator.set_state(payload["rng"]["order"].cpu())
            epoch = int(payload["epoch"])
            pyro.set_rng_seed((train_config.seed * 1_000_003 + epoch * 1_009 + rank) % 2**32)
        return Progress(
            int(payload["epoch"]),
            float(payload["best_valid_elbo"]),
            int(payload["best_epoch"]),
            [dict(row) for row in payload["history"]],
        )
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot resume from it ({first})") from None
