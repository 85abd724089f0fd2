"""fit(): stochastic variational inference with Pyro's Trace_ELBO, metrics and checkpoints."""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pyro.infer import ELBO
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .data import Dataset, minibatches
from .evaluate import elbo as elbo_per_point
from .model import VAE
from .objectives import OBJECTIVES, make_objective

__all__ = ["TrainConfig", "TrainingDiverged", "fit"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings.

    Args:
        num_epochs: Passes over the training split.
        batch_size: Images per SVI step.
        lr: Adam learning rate.
        num_particles: Samples of z per image in each ELBO estimate (vectorized); K for iwae.
        objective: ``elbo`` (Trace_ELBO), ``meanfield`` (TraceMeanField_ELBO, analytic KL
            where available) or ``iwae`` (the K-sample importance-weighted bound); see
            :func:`pyro_vae.objectives.make_objective`. ``train_elbo`` logs this objective.
        seed: Seed of the minibatch order and dynamic binarization (the CLI also seeds Pyro).
        log_every: Steps between progress-bar updates (each one syncs the device).
    """

    num_epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    num_particles: int = 1
    seed: int = 0
    log_every: int = 10
    objective: str = "elbo"

    def __post_init__(self) -> None:
        for name in ("num_epochs", "batch_size", "num_particles", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )


def _make_loss(config: TrainConfig) -> ELBO:
    return make_objective(config.objective, config.num_particles)


def _valid_elbo(vae: VAE, x: torch.Tensor, batch_size: int) -> float:
    vae.eval()
    total = sum(float(elbo_per_point(vae, batch).sum()) for batch in x.split(batch_size))
    vae.train()
    return total / x.shape[0]


def _check_finite(value: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(value):
        raise TrainingDiverged(
            f"loss became {float(value)} at epoch {epoch}, step {step}; the best checkpoint so "
            "far is kept. Try a lower --lr."
        )


def fit(
    vae: VAE,
    data: Dataset,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``vae`` on ``data.train`` by maximizing the ELBO with Adam.

    Each step estimates the full-data ELBO from a minibatch (the data plate has size N).
    Per epoch, the train ELBO (running mean over the epoch) and the validation ELBO (one
    draw per image) are logged; with ``run_dir``, rows go to ``metrics.csv`` and the
    best-validation model to ``checkpoint.pt``. Returns one dict per epoch.
    """
    if data.data_dim != vae.config.data_dim:
        raise ValueError(
            f"data has {data.data_dim} pixels but the model expects {vae.config.data_dim}"
        )
    if config.batch_size > data.train.shape[0]:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the training set "
            f"({data.train.shape[0]} images)"
        )
    run_dir = None if run_dir is None else Path(run_dir)
    data = data.to(vae.prior_loc.device)
    loss_fn = _make_loss(config).differentiable_loss
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    steps = math.ceil(data.train.shape[0] / config.batch_size)
    history: list[dict[str, Any]] = []
    best = -math.inf
    with tqdm(
        total=config.num_epochs * steps, disable=not progress, unit="step", dynamic_ncols=True
    ) as bar:
        for epoch in range(1, config.num_epochs + 1):
            start = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{config.num_epochs}")
            vae.train()
            train_elbo = _train_epoch(vae, data, loss_fn, optimizer, config, generator, epoch, bar)
            row = {
                "epoch": epoch,
                "train_elbo": train_elbo,
                "valid_elbo": _valid_elbo(vae, data.valid, config.batch_size),
                "seconds": time.perf_counter() - start,
            }
            history.append(row)
            logger.info(
                "epoch %d: train ELBO %.3f, valid ELBO %.3f",
                epoch,
                row["train_elbo"],
                row["valid_elbo"],
            )
            bar.set_postfix(
                train_elbo=f"{row['train_elbo']:.2f}", valid_elbo=f"{row['valid_elbo']:.2f}"
            )
            if run_dir is not None:
                _append_metrics(run_dir / METRICS, row, first=epoch == 1)
                if row["valid_elbo"] > best:
                    best = row["valid_elbo"]
                    save_checkpoint(
                        run_dir / CHECKPOINT,
                        vae,
                        epoch=epoch,
                        valid_elbo=best,
                        train_config=asdict(config),
                    )
    return history


def _train_epoch(
    vae: VAE,
    data: Dataset,
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    bar: tqdm,
) -> float:
    """One shuffled pass over the training split; returns its mean ELBO per image.

    Losses are accumulated on the device and read back every ``log_every`` steps.
    """
    num_data = data.train.shape[0]
    total, seen = torch.zeros((), device=data.train.device), 0
    batches = minibatches(num_data, config.batch_size, generator, data.train.device)
    for step, index in enumerate(batches, start=1):
        x = data.train_batch(index)
        loss = loss_fn(vae.model, vae.guide, x, num_data=num_data)  # -ELBO estimate, all N images
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * (x.shape[0] / num_data)
        seen += x.shape[0]
        if step % config.log_every == 0 or seen == num_data:
            _check_finite(total, epoch, step)
            bar.set_postfix(elbo=f"{-float(total) / seen:.2f}")
        bar.update(1)
    return -float(total) / num_data


def _append_metrics(path: Path, row: dict[str, Any], first: bool) -> None:
    with open(path, "w" if first else "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if first:
            writer.writeheader()
        writer.writerow(row)
