"""fit(): stochastic variational inference with Pyro's Trace_ELBO, metrics and checkpoints."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, JitTrace_ELBO
from torch import Tensor
from torch.optim import Adam
from tqdm.auto import tqdm

from .callbacks import Callback
from .checkpoint import save_checkpoint
from .data import Dataset
from .distributed import ELBOLoss, Replica
from .evaluate import batch_statistics
from .model import VAE
from .objectives import (
    OBJECTIVES,
    FreeBits_ELBO,
    JitSTL_ELBO,
    check_gradient_estimator,
    make_objective,
)
from .priors import fixed_priors
from .resume import LAST, Progress, get_rng_state, load_training_state, save_training_state
from .run_dir import RunDir, selection_column, write_metrics
from .schedules import LR_SCHEDULES, kl_weight, learning_rate, patience_exhausted
from .validation import check_instance, check_memory, check_positive_int, check_seed

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "fit",
    "check_compilable",
    "compiles_loss",
    "make_loss",
    "make_optimizer",
    "one_hot_labels",
    "train_epoch",
    "write_metrics",
]

logger = logging.getLogger(__name__)

CHECKPOINT = RunDir.CHECKPOINT
METRICS = RunDir.METRICS


_REMEDY = (
    "the files keep the last good epoch; lower the learning rate (--lr) "
    "or clip gradients (--clip-norm)"
)


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite; the message names the epoch and step."""


class RunNotWritten(OSError):
    """An epoch's files could not be written (no space, read-only, permission); the run
    folder keeps the epoch before it, and ``--resume`` continues once writing works again."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``saved_epoch`` is the last epoch kept in ``last.pt`` (0: none).

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C still does.
    """

    def __init__(self, epoch: int, saved_epoch: int, run_dir: Path | None) -> None:
        self.epoch, self.saved_epoch, self.run_dir = epoch, saved_epoch, run_dir
        if run_dir is None or saved_epoch == 0:
            where = "no epoch was saved"
        else:
            where = f"{run_dir / LAST} holds epoch {saved_epoch}"
        super().__init__(f"interrupted during epoch {epoch}; {where}")


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
        log_every: Steps between progress-bar updates and NaN/inf checks (each syncs the device).
        clip_norm: Clip the gradient's total 2-norm to this value before each step; None: off.
        jit: Compile the loss with ``JitTrace_ELBO`` (``JitSTL_ELBO`` for ``stl``; one graph
            per batch size, traced at its first step). None (default): wherever it applies,
            i.e. objective ``elbo`` with the ``pathwise`` or ``stl`` estimator, no free bits,
            no ``validate`` and every part of the VAE traceable, and eager elsewhere; True:
            always (an error where it does not apply); False: never (Pyro's eager ELBOs).
            :func:`compiles_loss` tells which a config gets.
        validate: Keep Pyro's distribution and handler checks on while training. Off by
            default: they cost 15-30% of a step, the data are checked when loaded and a
            NaN/inf loss or gradient is caught by the divergence checks all the same.
        kl_warmup: Epochs of KL warm-up: the latent site's ``log p(z) - log q(z|x)`` is
            weighted by beta rising linearly from 0 (epoch 1) to 1 (epoch ``kl_warmup + 1``),
            see :func:`~pyro_vae.schedules.kl_weight`; 0: off. Objectives ``elbo`` and
            ``meanfield`` only. ``train_elbo`` then logs the weighted objective;
            ``valid_elbo`` (and the best checkpoint) always use beta = 1.
        lr_schedule: ``constant``, ``exponential`` (times ``lr_gamma`` per epoch, down to
            ``lr_min``) or ``cosine`` (from ``lr`` to ``lr_min`` over ``num_epochs``); see
            :func:`~pyro_vae.schedules.learning_rate`.
        lr_gamma: Per-epoch factor of the exponential schedule, in (0, 1].
        lr_min: Floor of the exponential and cosine schedules, in [0, lr].
        patience: Stop when the validation ELBO (the IWAE bound for ``iwae``, see
            :func:`~pyro_vae.run_dir.selection_column`) has not improved for this many
            epochs (counted after the KL warm-up); None: train all ``num_epochs``.
        free_bits: Nats per latent layer and image below which a layer's KL term is not
            pushed lower (:class:`~pyro_vae.objectives.FreeBits_ELBO`); 0: off. Objective
            ``elbo`` without jit only; ``train_elbo`` then logs that objective.
        gradient_estimator: The encoder's gradient: ``pathwise`` (the objective's own
            reparameterized gradient), ``stl`` for ``elbo`` and ``meanfield`` (sticking the
            landing, :class:`~pyro_vae.objectives.STL_ELBO`) or ``dreg`` for ``iwae``
            (doubly reparameterized, :class:`~pyro_vae.objectives.DReG_IWAE_ELBO`). Same
            objective and decoder gradient; ``stl`` and ``dreg`` take no free bits, and
            refuse guides that score only their own draws (planar, radial, Sylvester) at the
            first step.
    """

    num_epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    num_particles: int = 1
    seed: int = 0
    log_every: int = 10
    clip_norm: float | None = None
    objective: str = "elbo"
    jit: bool | None = None
    validate: bool = False
    kl_warmup: int = 0
    lr_schedule: str = "constant"
    lr_gamma: float = 0.99
    lr_min: float = 0.0
    patience: int | None = None
    free_bits: float = 0.0
    gradient_estimator: str = "pathwise"

    def __post_init__(self) -> None:
        for name in ("num_epochs", "batch_size", "num_particles", "log_every"):
            value = getattr(self, name)
            check_positive_int(name, value)
        check_seed("seed", self.seed)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        clip = self.clip_norm
        if clip is not None and not (_is_number(clip) and clip > 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {clip!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )
        if not isinstance(self.validate, bool):
            raise TypeError(f"validate must be True or False, got {self.validate!r}")
        if not (self.jit is None or isinstance(self.jit, bool)):
            raise TypeError(f"jit must be None, True or False, got {self.jit!r}")
        if self.jit and self.objective != "elbo":
            raise ValueError(f"jit=True needs objective 'elbo', got {self.objective!r}")
        if self.jit and self.validate:
            raise ValueError("validate=True checks every step eagerly: it takes no jit=True")
        self._check_recipes()
        check_gradient_estimator(self.objective, self.gradient_estimator)
        if self.gradient_estimator != "pathwise" and self.free_bits:
            raise ValueError(
                f"gradient_estimator {self.gradient_estimator!r} takes no free_bits, got "
                f"free_bits {self.free_bits!r}"
            )

    def _check_recipes(self) -> None:
        """Validate the KL warm-up, learning-rate schedule and early-stopping fields."""
        warmup = self.kl_warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"kl_warmup must be an integer >= 0 (epochs), got {warmup!r}")
        if warmup and self.objective == "iwae":
            raise ValueError(
                f"kl_warmup needs objective 'elbo' or 'meanfield', got {self.objective!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr_schedule {self.lr_schedule!r}; "
                f"choose one of {', '.join(LR_SCHEDULES)}"
            )
        gamma, floor = self.lr_gamma, self.lr_min
        if not (_is_number(gamma) and 0 < gamma <= 1):
            raise ValueError(f"lr_gamma must be a number in (0, 1], got {gamma!r}")
        if not (_is_number(floor) and 0 <= floor <= self.lr):
            raise ValueError(f"lr_min must be a number in [0, lr={self.lr!r}], got {floor!r}")
        if self.patience is not None:
            check_positive_int("patience", self.patience)
        if not (_is_number(self.free_bits) and self.free_bits >= 0):
            raise ValueError(f"free_bits must be a number >= 0, got {self.free_bits!r}")
        if self.free_bits and (self.jit or self.objective != "elbo"):
            raise ValueError(
                f"free_bits needs objective 'elbo' without jit, got objective "
                f"{self.objective!r}, jit {self.jit}"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compiles_loss(config: TrainConfig, vae: VAE | None = None) -> bool:
    """Whether ``fit`` trains ``vae`` with a compiled loss (``JitTrace_ELBO``, or
    :class:`~pyro_vae.objectives.JitSTL_ELBO` for ``stl``) under ``config``: when ``jit`` is
    True, or None and the objective is ``elbo`` with the ``pathwise`` or ``stl`` estimator, no free
    bits, no validation and a traceable VAE (:attr:`~pyro_vae.model.VAE.traceable`)."""
    if config.jit is not None:
        return config.jit
    return (
        config.objective == "elbo"
        and config.gradient_estimator in ("pathwise", "stl")
        and not config.free_bits
        and not config.validate
        and (vae is None or vae.traceable)
    )


def check_compilable(config: TrainConfig, vae: VAE) -> None:
    """Raise ValueError when ``config.jit`` is True and a part of ``vae`` is not traceable."""
    if config.jit and not vae.traceable:
        parts = {
            type(m).__name__
            for m in vae.modules()
            if m is not vae and not getattr(m, "traceable", True)
        }
        raise ValueError(
            f"jit=True cannot compile this VAE: {', '.join(sorted(parts))} is not traceable; "
            "leave jit unset (compiled where possible) or turn it off"
        )


def make_loss(config: TrainConfig, vae: VAE | None = None) -> ELBO:
    """The Pyro ELBO that ``fit`` trains ``vae`` with under ``config`` (objective, estimator,
    jit, free bits); wrap it with the VAE in :class:`~pyro_vae.distributed.ELBOLoss`."""
    if compiles_loss(config, vae):
        cls = JitSTL_ELBO if config.gradient_estimator == "stl" else JitTrace_ELBO
        return cls(
            num_particles=config.num_particles,
            vectorize_particles=config.num_particles > 1,
            max_plate_nesting=1,
            ignore_jit_warnings=True,
        )
    if config.free_bits:
        return FreeBits_ELBO(config.free_bits, config.num_particles)
    return make_objective(config.objective, config.num_particles, config.gradient_estimator)


def make_optimizer(params: Iterable[Tensor], lr: float, device: torch.device) -> Adam:
    """One Adam over all parameters, fused into a few kernels where torch supports it."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    fused = device.type == "cuda" or (device.type == "cpu" and version >= (2, 4))
    return torch.optim.Adam(params, lr=lr, fused=fused, foreach=None if fused else True)


def _validate(
    vae: VAE,
    x: torch.Tensor,
    batch_size: int,
    replica: Replica,
    condition: Tensor | None = None,
    dtype: torch.dtype | None = None,
    num_particles: int | None = None,
) -> dict[str, float]:
    """Mean ELBO (``valid_elbo``) of the images x ``(N, P)`` as stored, from one draw per
    image; with ``num_particles`` K, from K draws, together with the IWAE bound of those draws
    (``valid_bound``). Each batch becomes ``dtype`` (default: x's) as it is scored, so uint8
    images are never all floats at once."""
    vae.eval()
    dtype = dtype or x.dtype
    totals = x.new_zeros(2, dtype=dtype)  # ELBO and IWAE bound
    shard = replica.shard(x)
    conditions = [None] * shard.shape[0] if condition is None else replica.shard(condition)
    with fixed_priors(vae):  # no step inside: a VampPrior encodes its pseudo-inputs once
        for start in range(0, shard.shape[0], batch_size):
            batch = shard[start : start + batch_size].to(dtype)
            c = None if condition is None else conditions[start : start + batch_size]
            scores = batch_statistics(vae, batch, num_particles or 1, condition=c)
            totals += torch.stack((scores["elbo"].sum(), scores["log_likelihood"].sum()))
    vae.train()
    elbo, bound = (replica.sum(totals) / x.shape[0]).tolist()
    return {"valid_elbo": elbo, **({"valid_bound": bound} if num_particles else {})}


def fit(
    vae: VAE,
    data: Dataset,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    replica: Replica | None = None,
    callbacks: Sequence[Callback] = (),
) -> list[dict[str, Any]]:
    """Train ``vae`` on ``data.train`` by maximizing the ELBO with Adam.

    Each step estimates the full-data ELBO from a minibatch (the data plate has size N).
    Per epoch, the train ELBO (running mean over the epoch) and the validation ELBO (one
    draw per image; with the IWAE bound, K draws and the bound of those draws) are logged;
    with ``run_dir``, rows go to ``metrics.csv``, the best-validation model (by
    :func:`~pyro_vae.run_dir.selection_column`) to ``checkpoint.pt`` and the whole training
    state (optimizer, random streams, history) to ``last.pt``. With ``resume``, training
    continues from ``run_dir/last.pt`` up to ``config.num_epochs``; on the CPU the result is
    bit-identical to an uninterrupted run. Returns one dict per epoch (all epochs when resumed).

    Per epoch, ``config.kl_warmup`` sets the KL weight and ``config.lr_schedule`` the
    learning rate (logged as ``kl_weight`` and ``lr`` when in use); with ``config.patience``,
    training stops once the validation value has not improved for that many epochs.

    Raises:
        TrainingDiverged: a loss or gradient became NaN/inf; the files hold the last good state.
        TrainingInterrupted: Ctrl-C; ``last.pt`` holds the last completed epoch.

    With a :class:`~pyro_vae.distributed.DistributedReplica`, this process trains its shard
    of every epoch through DistributedDataParallel and only rank 0 writes files.

    ``callbacks`` (:class:`~pyro_vae.callbacks.Callback`) are called on that process: at the
    start, every ``config.log_every`` steps, after each recorded epoch and at the end.
    """
    replica = replica or Replica()
    _check_fit_args(vae, data, config, run_dir, resume, replica)
    for callback in callbacks:
        check_instance("each of callbacks", callback, Callback)
    source = None if run_dir is None else Path(run_dir)  # what every rank resumes from
    run_dir = None if run_dir is None or not replica.is_main else Path(run_dir)
    if run_dir is not None and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = vae.prior_loc.device
    data = data.to(device)  # once: every minibatch is then indexed on the device
    valid = data.valid  # as stored (uint8 for binary pixels); floats one batch at a time
    elbo_loss = ELBOLoss(vae, make_loss(config, vae))
    loss_fn = replica.wrap(elbo_loss)
    optimizer = make_optimizer(loss_fn.parameters(), config.lr, device)
    generator = torch.Generator().manual_seed(config.seed)
    state = Progress()
    if resume:
        state = _restore(source, vae, optimizer, generator, config, replica)
    steps = replica.num_batches(data.num_train, config.batch_size)
    callbacks = tuple(callbacks) if replica.is_main else ()
    for callback in callbacks:
        callback.on_fit_start(vae, steps)
    with (
        warnings.catch_warnings(),
        pyro.validation_enabled(config.validate),
        tqdm(
            total=config.num_epochs * steps,
            initial=state.epoch * steps,
            disable=not (progress and replica.is_main),
            unit="step",
            dynamic_ncols=True,
        ) as bar,
    ):
        # Pyro warns of each NaN loss; the divergence check reports the first one instead
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        for epoch in range(state.epoch + 1, config.num_epochs + 1):
            if patience_exhausted(
                state.epoch, state.best_epoch, config.patience, config.kl_warmup
            ):
                logger.info("early stop after epoch %d (best: %d)", state.epoch, state.best_epoch)
                break
            recipes = _start_epoch(elbo_loss, optimizer, config, epoch)
            try:
                row = _run_epoch(
                    vae, data, valid, loss_fn, optimizer, config, generator, epoch, bar,
                    replica, callbacks,
                )  # fmt: skip
                row.update(recipes)
                state = _end_epoch(run_dir, vae, optimizer, generator, config, state, row, replica)
                for callback in callbacks:
                    callback.on_epoch_end(epoch, row, vae)
            except KeyboardInterrupt:
                saved = _saved_epoch(run_dir, state.epoch)
                raise TrainingInterrupted(epoch, saved, run_dir) from None
    for callback in callbacks:
        callback.on_fit_end(state.history)
    return state.history


def _saved_epoch(run_dir: Path | None, recorded: int) -> int:
    """The epoch ``last.pt`` holds: ``recorded`` (the last one ``fit`` finished recording)
    unless an interrupt landed between the file's rename and the end of the epoch's writes.
    """
    if run_dir is None:
        return recorded
    saved = RunDir(run_dir).saved_epoch()
    return recorded if saved is None else saved


def _start_epoch(
    loss: ELBOLoss, optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int
) -> dict[str, float]:
    """Set the KL weight and learning rate of ``epoch``; returns the metrics of those in use.

    Both are closed forms of the epoch, so a resumed run continues them exactly.
    """
    loss.beta = kl_weight(epoch, config.kl_warmup)
    lr = learning_rate(
        epoch, config.lr, config.lr_schedule, config.num_epochs, config.lr_gamma, config.lr_min
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    columns = {"kl_weight": loss.beta} if config.kl_warmup else {}
    if config.lr_schedule != "constant":
        columns["lr"] = lr
    return columns


def _check_fit_args(
    vae: VAE,
    data: Dataset,
    config: TrainConfig,
    run_dir: str | Path | None,
    resume: bool,
    replica: Replica,
) -> None:
    check_instance("vae", vae, VAE)
    check_instance("data", data, Dataset, "e.g. load_dataset(DataSpec('digits'))")
    check_instance("config", config, TrainConfig)
    if run_dir is not None:
        check_instance("run_dir", run_dir, (str, Path))
    if data.data_dim != vae.config.data_dim:
        raise ValueError(
            f"data has {data.data_dim} pixels but the model expects {vae.config.data_dim}"
        )
    if vae.config.condition_dim:
        _check_labels(vae, data, config)
    cfg = vae.config  # a step holds K x B draws of every pixel and hidden unit, for backward
    per_draw = vae.likelihood.outputs_per_pixel * cfg.data_dim + 2 * sum(cfg.hidden_dims)
    per_draw += sum(cfg.latent_dims) ** 2
    check_memory(
        f"a step of num_particles {config.num_particles} x batch_size {config.batch_size}",
        16 * config.num_particles * config.batch_size * per_draw,
    )
    vae.config.check_data(data.valid, data.pixels, "the validation images")
    if config.batch_size > data.num_train:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the training set "
            f"({data.num_train} images)"
        )
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir that holds last.pt")
    check_compilable(config, vae)


def _check_labels(vae: VAE, data: Dataset, config: TrainConfig) -> None:
    """A conditional VAE trains on one-hot labels: every split it uses needs them."""
    width = vae.config.condition_dim
    missing = [name for name in ("train", "valid") if data.labels(name) is None]
    if missing:
        raise ValueError(
            f"a conditional VAE (condition_dim {width}) trains on the data's labels, and the "
            f"{' and '.join(missing)} split has none"
        )
    if data.num_classes > width:
        raise ValueError(f"the data have {data.num_classes} classes but condition_dim is {width}")


def one_hot_labels(vae: VAE, data: Dataset, name: str) -> Tensor | None:
    """The condition of split ``name`` for a conditional VAE: one-hot labels ``(N, C)``.

    None for an unconditional VAE; C is ``vae.config.condition_dim``.
    """
    width = vae.config.condition_dim
    if not width:
        return None
    labels = data.labels(name)
    if labels is None:
        raise ValueError(f"a conditional VAE needs labels, and the {name!r} split has none")
    return torch.nn.functional.one_hot(labels, width).to(data.float_dtype)


def _restore(
    run_dir: Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
    replica: Replica,
) -> Progress:
    """Load ``last.pt`` into the model, optimizer and this rank's random streams; returns the
    progress. Every rank reads the file; rank 0 also rewrites ``metrics.csv``."""
    folder = RunDir(run_dir)
    state = load_training_state(
        folder.last, vae, optimizer, generator, config, replica.rank, replica.world_size
    )
    for group in optimizer.param_groups:  # a resumed run may lower the learning rate
        group["lr"] = config.lr
    if replica.is_main:  # drops the row of an epoch lost in a crash
        folder.write_metrics(state.history)
    return state


def _run_epoch(
    vae: VAE,
    data: Dataset,
    valid: Tensor,
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    bar: tqdm,
    replica: Replica,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train one epoch and validate on ``valid`` ``(N, P)``; returns its metrics row."""
    start = time.perf_counter()
    bar.set_description(f"epoch {epoch}/{config.num_epochs}")
    vae.train()
    train_elbo = train_epoch(
        vae, data, loss_fn, optimizer, config, generator, epoch, bar, replica, callbacks
    )
    particles = config.num_particles if config.objective == "iwae" else None
    try:
        condition = one_hot_labels(vae, data, "valid")
        scores = _validate(
            vae, valid, config.batch_size, replica, condition, data.float_dtype, particles
        )
    except ValueError as error:
        raise _invalid_parameters(error, f"epoch {epoch}, validation") from None
    for name, value in scores.items():
        if not math.isfinite(value):
            what = "ELBO" if name == "valid_elbo" else "IWAE bound"
            raise TrainingDiverged(
                f"the validation {what} became {value} after epoch {epoch}; {_REMEDY}"
            )
    row = {"epoch": epoch, "train_elbo": train_elbo, **scores}
    row["seconds"] = time.perf_counter() - start
    valid_elbo = scores["valid_elbo"]
    logger.info("epoch %d: train ELBO %.3f, valid ELBO %.3f", epoch, train_elbo, valid_elbo)
    bar.set_postfix(train_elbo=f"{train_elbo:.2f}", valid_elbo=f"{valid_elbo:.2f}")
    return row


def _end_epoch(
    run_dir: Path | None,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
    state: Progress,
    row: dict[str, Any],
    replica: Replica | None = None,
) -> Progress:
    """Record a completed epoch: metrics, then the best checkpoint, then ``last.pt``.

    In this order a crash between two writes leaves ``last.pt`` at the previous epoch and
    a resumed run redoes this epoch identically, rewriting the same files.
    """
    best, best_epoch = state.best_valid_elbo, state.best_epoch
    value = row[selection_column(row)]
    if value > best:
        best, best_epoch = value, row["epoch"]
    new = Progress(row["epoch"], best, best_epoch, [*state.history, row])
    replica = replica or Replica()
    rank_states = None  # several processes: every rank's random streams go into last.pt
    if replica.world_size > 1:
        rank_states = replica.gather(get_rng_state(generator))
    if run_dir is None:
        return new
    folder = RunDir(run_dir)
    try:
        folder.write_metrics(new.history)
        if best_epoch == row["epoch"]:
            save_checkpoint(
                folder.checkpoint,
                vae,
                epoch=best_epoch,
                **{key: row[key] for key in ("valid_elbo", "valid_bound") if key in row},
                train_config=asdict(config),
            )
        save_training_state(folder.last, vae, optimizer, generator, config, new, rank_states)
    except OSError as error:
        try:  # the metrics of the epochs last.pt holds, if anything can still be written
            folder.write_metrics(state.history)
        except OSError:
            pass
        kept = f"epoch {state.epoch}" if state.epoch else "no epoch"
        raise RunNotWritten(
            f"epoch {row['epoch']} could not be recorded ({error}); {run_dir} keeps {kept}"
        ) from None
    return new


def train_epoch(
    vae: VAE,
    data: Dataset,
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    bar: tqdm | None = None,
    replica: Replica | None = None,
    callbacks: Sequence[Callback] = (),
) -> float:
    """One shuffled pass over the training split, as ``fit`` runs it; its mean ELBO per image.

    ``loss_fn(x, num_data, subsample)`` is the (possibly wrapped) :class:`ELBOLoss`
    (:func:`make_loss`), ``optimizer`` e.g. :func:`make_optimizer`'s, ``generator`` orders the
    minibatches, ``epoch`` (from 1) names the epoch in errors. Losses (and, when clipping,
    gradient norms) stay on the device and are read back and checked for NaN/inf every
    ``log_every`` steps, together with the parameters; ``bar`` is advanced once per step and
    ``callbacks`` hear of every ``log_every``-th.
    """
    bar = bar if bar is not None else tqdm(disable=True)
    replica = replica or Replica()
    num_data = data.num_train
    total, seen = torch.zeros((), device=data.train.device), 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    window: list[Tensor] = []  # loss (and gradient norm) of each step since the last check
    batches = replica.batches(num_data, config.batch_size, generator, epoch, data.train.device)
    labels = one_hot_labels(vae, data, "train")
    for step, index in enumerate(batches, start=1):
        x = data.train_batch(index)
        condition = None if labels is None else labels[index]
        try:
            loss, norm = _step(
                loss_fn,
                optimizer,
                x,
                num_data,
                replica.subsample(index),
                config.clip_norm,
                condition,
            )
        except ValueError as error:  # distribution validation refuses NaN/inf parameters
            _check_finite(window, epoch, step - len(window), params)  # an earlier step?
            raise _invalid_parameters(error, f"epoch {epoch}, step {step}") from None
        window.append(loss.reshape(1) if norm is None else torch.stack((loss, norm)))
        total += loss * (x.shape[0] / num_data)
        seen += x.shape[0]
        if step % config.log_every == 0:
            _check_finite(window, epoch, step - len(window) + 1, params)
            window.clear()
            running = -float(total) / seen
            bar.set_postfix(elbo=f"{running:.2f}")
            for callback in callbacks:
                callback.on_step(epoch, step, running)
        bar.update(1)
    _check_finite(window, epoch, step - len(window) + 1, params)
    total = replica.sum(total)
    return -float(total) / (seen * replica.world_size)


def _step(
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    num_data: int,
    subsample: Tensor | None,
    clip_norm: float | None,
    condition: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One Adam step on the minibatch ``x`` ``(B, P)`` (conditioned on ``condition``).

    Returns the loss and, with ``clip_norm``, the gradient's total norm before clipping
    (None without: reading every gradient once more costs about a tenth of a step).
    """
    if condition is None:
        loss = loss_fn(x, num_data, subsample)  # -ELBO estimate of all N images
    else:
        loss = loss_fn(x, num_data, subsample, condition)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = None
    if clip_norm is not None:  # the optimizer's own list: no walk over the module tree
        grads = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip_norm).to(loss.dtype)
    optimizer.step()
    return loss.detach(), norm


def _check_finite(
    window: list[Tensor], epoch: int, first_step: int, params: list[Tensor] | None = None
) -> None:
    """Raise TrainingDiverged naming the first step whose loss or gradient is NaN/inf.

    Without gradient norms in ``window``, a NaN/inf gradient shows in the parameters Adam
    updated with it and in the loss of the next step; both are checked.
    """
    if not window:
        return
    values = torch.stack(window).cpu()  # (steps, 1): loss, or (steps, 2): loss, gradient norm
    finite = values.isfinite().all(dim=1)
    where = f"training diverged at epoch {epoch}, step"
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        row = values[index].tolist()
        if len(row) == 2:
            what = f"loss {row[0]:g}, gradient norm {row[1]:g}"
        else:
            what = f"loss {row[0]:g} (from this step or a NaN/inf gradient of the step before)"
        raise TrainingDiverged(f"{where} {first_step + index}: {what}; {_REMEDY}")
    if values.shape[1] == 1 and params:
        sums = torch.stack([p.detach().sum() for p in params])
        if not bool(sums.isfinite().all()):
            last = first_step + len(window) - 1
            raise TrainingDiverged(
                f"{where} {last}: a NaN/inf gradient made the parameters NaN/inf; {_REMEDY}"
            )


def _invalid_parameters(error: ValueError, when: str) -> Exception:
    """TrainingDiverged for Pyro's 'found invalid values' error; other errors unchanged."""
    message = str(error)
    if "found invalid values" not in message:
        return error
    where = message.split(" of distribution")[0].split(" (Tensor")[0]  # "Expected parameter x"
    return TrainingDiverged(
        f"training diverged at {when}: NaN/inf in a distribution "
        f"parameter ({where.removeprefix('Expected parameter ')}); {_REMEDY}"
    )
