"""fit(): stochastic variational inference with Pyro's Trace_ELBO, metrics and checkpoints."""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from torch import Tensor
from torch.optim import Adam
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .data import Dataset
from .distributed import ELBOLoss, Replica
from .evaluate import elbo as elbo_per_point
from .model import VAE

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
        num_particles: Samples of z per image in each ELBO estimate (vectorized).
        seed: Seed of the minibatch order and dynamic binarization (the CLI also seeds Pyro).
        log_every: Steps between progress-bar updates (each one syncs the device).
        jit: Compile the loss with ``JitTrace_ELBO`` (one graph per batch size).
    """

    num_epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    num_particles: int = 1
    seed: int = 0
    log_every: int = 10
    jit: bool = False

    def __post_init__(self) -> None:
        for name in ("num_epochs", "batch_size", "num_particles", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.jit, bool):
            raise TypeError(f"jit must be True or False, got {self.jit!r}")


def _make_loss(config: TrainConfig) -> Trace_ELBO:
    options = {
        "num_particles": config.num_particles,
        "vectorize_particles": config.num_particles > 1,
        "max_plate_nesting": 1,
    }
    if config.jit:
        return JitTrace_ELBO(**options, ignore_jit_warnings=True)
    return Trace_ELBO(**options)


def _make_optimizer(params: Iterable[Tensor], lr: float, device: torch.device) -> Adam:
    """One Adam over all parameters, fused into a few kernels where torch supports it."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    fused = device.type == "cuda" or (device.type == "cpu" and version >= (2, 4))
    return torch.optim.Adam(params, lr=lr, fused=fused, foreach=None if fused else True)


def _valid_elbo(vae: VAE, x: torch.Tensor, batch_size: int, replica: Replica) -> float:
    vae.eval()
    total = x.new_zeros(())
    for batch in replica.shard(x).split(batch_size):
        total += elbo_per_point(vae, batch).sum()
    vae.train()
    return float(replica.sum(total)) / x.shape[0]


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
    replica: Replica | None = None,
) -> list[dict[str, Any]]:
    """Train ``vae`` on ``data.train`` by maximizing the ELBO with Adam.

    Each step estimates the full-data ELBO from a minibatch (the data plate has size N).
    Per epoch, the train ELBO (running mean over the epoch) and the validation ELBO (one
    draw per image) are logged; with ``run_dir``, rows go to ``metrics.csv`` and the
    best-validation model to ``checkpoint.pt``. Returns one dict per epoch.

    With a :class:`~pyro_vae.distributed.DistributedReplica`, this process trains its shard
    of every epoch through DistributedDataParallel and only rank 0 writes files.
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
    replica = replica or Replica()
    if config.jit and replica.world_size > 1:
        raise ValueError("jit=True is not supported with several processes; use jit=False")
    run_dir = None if run_dir is None or not replica.is_main else Path(run_dir)
    device = vae.prior_loc.device
    data = data.to(device)  # once: every minibatch is then indexed on the device
    loss_fn = replica.wrap(ELBOLoss(vae, _make_loss(config)))
    optimizer = _make_optimizer(loss_fn.parameters(), config.lr, device)
    generator = torch.Generator().manual_seed(config.seed)
    steps = replica.num_batches(data.train.shape[0], config.batch_size)
    history: list[dict[str, Any]] = []
    best = -math.inf
    with tqdm(
        total=config.num_epochs * steps,
        disable=not (progress and replica.is_main),
        unit="step",
        dynamic_ncols=True,
    ) as bar:
        for epoch in range(1, config.num_epochs + 1):
            start = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{config.num_epochs}")
            vae.train()
            train_elbo = _train_epoch(
                vae, data, loss_fn, optimizer, config, generator, epoch, bar, replica
            )
            row = {
                "epoch": epoch,
                "train_elbo": train_elbo,
                "valid_elbo": _valid_elbo(vae, data.valid, config.batch_size, replica),
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
    replica: Replica,
) -> float:
    """One shuffled pass over the training split; returns its mean ELBO per image.

    ``loss_fn(x, num_data, subsample)`` is the (possibly wrapped) :class:`ELBOLoss`.
    Losses are accumulated on the device and read back every ``log_every`` steps.
    """
    num_data = data.train.shape[0]
    total, seen = torch.zeros((), device=data.train.device), 0
    batches = replica.batches(num_data, config.batch_size, generator, epoch, data.train.device)
    for step, index in enumerate(batches, start=1):
        x = data.train_batch(index)
        loss = loss_fn(x, num_data, replica.subsample(index))  # -ELBO estimate, all N images
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * (x.shape[0] / num_data)
        seen += x.shape[0]
        if step % config.log_every == 0:
            _check_finite(total, epoch, step)
            bar.set_postfix(elbo=f"{-float(total) / seen:.2f}")
        bar.update(1)
    total = replica.sum(total)
    _check_finite(total, epoch, step)
    return -float(total) / (seen * replica.world_size)


def _append_metrics(path: Path, row: dict[str, Any], first: bool) -> None:
    with open(path, "w" if first else "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if first:
            writer.writeheader()
        writer.writerow(row)
