"""``pyro-vae train``: one run in its folder, fresh, resumed, replaced or restarted."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyro
import torch

from ..callbacks import Callback, TensorBoardCallback
from ..checkpoint import load_checkpoint, load_weights, read_payload
from ..data import Dataset, DataSpec, load_dataset
from ..distributed import Replica, init_replica
from ..model import VAE, VAEConfig
from ..pictures import save_curves
from ..run_dir import RunDir
from ..run_folder import PREVIOUS, CommitOnFirstEpoch, RunFolder
from ..runs import (
    discard_unstarted,
    prepare_run_dir,
    restarted_run,
    run_folder,
    run_record,
    save_run_pictures,
    set_aside_old_run,
)
from ..train import (
    RunNotWritten,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    check_compilable,
    compiles_loss,
    fit,
    one_hot_labels,
)
from .arguments import (
    UsageError,
    _train_config,
)
from .common import (
    _layers,
    _one_line,
    _recipe_words,
    _require_tensorboard,
    _resume_settings,
    data_spec,
    model_config,
    resolve_device,
)

# ---------------------------------------------------------------- commands


def _continue_after_restart(args: argparse.Namespace) -> bool:
    """A worker restarted by ``torchrun --max-restarts`` continues its job's run: resumes it
    when an epoch was completed, else replaces its unstarted attempt. Whether it resumes."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not restarted or args.resume is not None or args.data is None:
        return False
    spec = data_spec(args.data, args.binarize, likelihood=args.likelihood)
    run_dir = args.out or Path("runs") / f"{spec.name}-{args.guide}"
    action = restarted_run(run_dir)
    if action == "replace":
        args.overwrite = True
    elif action == "resume":
        args.resume, args.overwrite = run_dir, False
        if int(os.environ.get("RANK", "0")) == 0:
            epoch = read_payload(RunDir(run_dir).last).get("epoch")
            print(
                f"pyro-vae: restarted: continuing {run_dir} from {RunDir.LAST} (epoch {epoch})",
                file=sys.stderr,
            )
    return action == "resume"


def cmd_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    restarted = _continue_after_restart(args)
    spec, config, train_config = _settings(args, restarted)
    data = load_dataset(spec)
    if train_config.batch_size > data.num_train:
        raise UsageError(
            f"--batch-size {train_config.batch_size} is larger than the training set "
            f"({data.num_train} images)"
        )
    config = config or model_config(args, data, spec)
    config.check_data(data.valid, data.pixels, "the validation images")
    if args.tensorboard:
        _require_tensorboard()
    replica, device = init_replica(device)  # under torchrun: join the process group
    pyro.set_rng_seed(train_config.seed)  # the same initial weights on every rank
    vae = VAE(config).to(device)  # guide options are checked here, before the folder exists
    check_compilable(train_config, vae)
    init = _initial_weights(args, vae)
    pyro.set_rng_seed(train_config.seed + replica.rank)  # then each rank draws its own noise
    run_dir, created = args.resume, False
    if args.resume is None:
        run_dir, created = prepare_run_dir(
            args.out, spec, args.guide, args.overwrite, replica.is_main
        )
    folder = run_folder(run_dir)
    if not replica.is_main:
        return _train_in_folder(args, vae, data, train_config, folder, replica, [])[0] or 0
    try:
        return _train_as_main(args, vae, data, spec, train_config, folder, replica, device, init)
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _initial_weights(args: argparse.Namespace, vae: VAE) -> dict[str, Any]:
    """``--init``: copy the weights of a run's best checkpoint (or of a checkpoint file) into
    ``vae``. Returns what config.json records of them (empty without ``--init``, and when
    resuming: the run's own weights continue)."""
    if args.init is None or args.resume is not None:
        return {}
    path = RunDir(args.init).checkpoint if args.init.is_dir() else args.init
    payload = load_weights(vae, path)
    return {
        "init": str(path.resolve()),
        "init_checkpoint": {key: payload.get(key) for key in ("epoch", "valid_elbo")},
    }


def _settings(
    args: argparse.Namespace, restarted: bool
) -> tuple[DataSpec, VAEConfig | None, TrainConfig]:
    """The data, model (None: built from the flags once the data are known) and training
    settings: a resumed run's own, or the command line's."""
    if args.resume is None:
        if args.data is None:
            raise UsageError(
                f"--preset {args.preset} needs the data: add --data binarized-mnist PATH"
            )
        spec = data_spec(args.data, args.binarize, likelihood=args.likelihood)
        return spec, None, _train_config(args)
    if int(os.environ.get("RANK", "0")) == 0 and (args.resume / PREVIOUS).is_dir():
        with run_folder(args.resume):  # a killed overwrite: settle it
            pass
    return _resume_settings(args, check_flags=not restarted)


def _train_as_main(
    args: argparse.Namespace,
    vae: VAE,
    data: Dataset,
    spec: DataSpec,
    train_config: TrainConfig,
    folder: RunFolder,
    replica: Replica,
    device: torch.device,
    init: dict[str, Any],
) -> int:
    """Rank 0: take the folder's lock, record the run (and ``init``, the weights it starts
    from), train, report."""
    resuming, run = args.resume is not None, RunDir(folder.path)
    record = {**run_record(vae.config, train_config, spec, getattr(args, "argv", None)), **init}
    with folder:  # one writer: refused while another live process trains here
        if resuming:
            for stale in run.path.glob(".*.tmp"):  # left by a writer killed before its rename
                stale.unlink()
        else:
            set_aside_old_run(folder, args.overwrite)
            run.write_record(record)
        more = replica.world_size - 1
        print(
            f"{'resuming' if resuming else 'training'} {_model_words(vae.config)} on "
            f"{spec.name}: {data.num_train} train / {data.valid.shape[0]} valid images of "
            f"{data.data_dim} pixels, on {device}, "
            + ("compiled loss" if compiles_loss(train_config, vae) else "eager loss")
            + _recipe_words(args, train_config)
            + (
                f", from the weights of {init['init']} (epoch {init['init_checkpoint']['epoch']})"
                if init
                else ""
            )
            + (f" and {more} more processes" if more else ""),
            file=sys.stderr,
        )

        def commit() -> None:  # the new settings are recorded once an epoch ran with them
            folder.commit()
            if resuming:
                run.write_record(record)

        callbacks: list[Callback] = [CommitOnFirstEpoch(commit)]
        if args.tensorboard:
            callbacks.append(TensorBoardCallback(run.tensorboard, data.split("valid")))
        status, history = _train_in_folder(
            args, vae, data, train_config, folder, replica, callbacks
        )
        if status is not None:
            return status
        return _report_run(run.path, data, device, train_config, history)


def _model_words(config: VAEConfig) -> str:
    """``"a VAE (diagonal guide, standard prior, mlp networks, bernoulli likelihood)"``."""
    return (
        f"a VAE ({_layers(config)}{config.guide} guide, {config.prior} prior, "
        f"{config.arch} networks, {config.likelihood} likelihood)"
    )


def _report_run(
    run_dir: Path,
    data: Dataset,
    device: torch.device,
    train_config: TrainConfig,
    history: list[dict[str, Any]],
) -> int:
    """Pictures and curves of a finished run, and what it wrote, on stdout."""
    folder = RunDir(run_dir)
    vae, payload = load_checkpoint(folder.checkpoint, map_location=device)
    condition = one_hot_labels(vae, data, "valid")
    condition = None if condition is None else condition.to(device)
    pictures = save_run_pictures(vae, data.split("valid").to(device), run_dir, condition)
    pictures.append(save_curves({run_dir.name: folder.read_metrics()}, folder.curves))
    early = len(history) < train_config.num_epochs  # only early stopping ends a run sooner
    note = f" (stopped early: patience {train_config.patience})" if early else ""
    if train_config.kl_warmup and len(history) <= train_config.kl_warmup:
        note += (
            f"; the run ended inside its {train_config.kl_warmup}-epoch KL warm-up, so the "
            "model has not yet been trained on the full ELBO"
        )
    best = f"best valid ELBO {payload['valid_elbo']:.3f} nats"
    if "valid_bound" in payload:
        best = (
            f"best valid IWAE bound (K = {train_config.num_particles}) "
            f"{payload['valid_bound']:.3f} nats (valid ELBO {payload['valid_elbo']:.3f})"
        )
    print(f"{best} at epoch {payload['epoch']} of {len(history)}{note}")
    for path in (folder.config, folder.checkpoint, folder.last, folder.metrics):
        print(f"  wrote {path}")
    for path in pictures:
        print(f"  wrote {path}")
    print(f"next: pyro-vae evaluate {run_dir}")
    return 0


def _train_in_folder(
    args: argparse.Namespace,
    vae: VAE,
    data: Dataset,
    train_config: TrainConfig,
    folder: RunFolder,
    replica: Replica,
    callbacks: list[Callback],
) -> tuple[int | None, list[dict[str, Any]]]:
    """Run ``fit`` in the folder: (None, its history) when it finished, else (the exit status
    of its stop, [])

    A run that stops before completing an epoch leaves no files, and an old run set aside by
    ``--overwrite`` comes back.
    """
    run_dir = folder.path
    try:
        with _sigterm_as_interrupt():
            history = fit(
                vae,
                data,
                train_config,
                run_dir,
                not args.quiet,
                args.resume is not None,
                replica,
                callbacks,
            )
    except (TrainingDiverged, TrainingInterrupted, RunNotWritten) as error:
        return (_report_stop(error, folder) if replica.is_main else 1), []
    except BaseException:
        if replica.is_main:
            _undo_unstarted(folder)
        raise
    return None, history


def _undo_unstarted(folder: RunFolder) -> bool:
    """Drop a run that completed no epoch (and bring back the run it replaced); whether an
    old run came back."""
    discard_unstarted(folder.path)
    return folder.restore()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM (what schedulers and ``kill`` send) stops training like Ctrl-C does.

    Background processes may ignore SIGINT; SIGTERM then gives the same clean stop: the epoch
    in progress is dropped, ``last.pt`` keeps the one before, and ``--resume`` continues.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _report_stop(
    error: TrainingDiverged | TrainingInterrupted | RunNotWritten, folder: RunFolder
) -> int:
    """One line on stderr for a diverged or unwritable (status 1) or interrupted (130) run."""
    run_dir = folder.path
    started = (RunDir(run_dir).last).exists()
    restored = False if started else _undo_unstarted(folder)
    if isinstance(error, TrainingInterrupted):
        hint = f"; continue with: pyro-vae train --resume {run_dir}" if started else ""
        print(f"pyro-vae: {_one_line(error)}{hint}", file=sys.stderr)
        return 130
    if isinstance(error, RunNotWritten):
        hint = f"; then: pyro-vae train --resume {run_dir}" if started else ""
    elif started:
        hint = f"; then: pyro-vae train --resume {run_dir} --lr LOWER"
    elif restored:
        hint = f"; no epoch had finished, so {run_dir} keeps the run it held before"
    else:
        hint = f"; no epoch had finished, so {run_dir} keeps no run"
    print(f"pyro-vae: error: {_one_line(error)}{hint}", file=sys.stderr)
    return 1
