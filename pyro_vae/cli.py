"""Command line: ``pyro-vae train | evaluate | sample``; the only module that seeds RNGs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pyro
import torch

from . import __version__
from .checkpoint import CheckpointError, atomic_write, load_checkpoint
from .data import BINARIZE_MODES, DATASETS, DataError, DataSpec, load_dataset
from .distributed import finish_worker, init_replica
from .evaluate import evaluate
from .guides import GUIDES
from .model import VAE, VAEConfig
from .pictures import save_image_grid
from .train import CHECKPOINT, METRICS, TrainConfig, TrainingDiverged, fit

__all__ = ["main"]

CONFIG = "config.json"
RUN_FILES = (CONFIG, CHECKPOINT, METRICS, "samples.png", "reconstructions.png")


class UsageError(ValueError):
    """Bad command-line input; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


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


# ---------------------------------------------------------------- parser


def _add_data_args(parser: argparse.ArgumentParser, default: Sequence[str] | None) -> None:
    parser.add_argument(
        "--data",
        nargs="+",
        metavar=("NAME", "PATH"),
        default=default,
        help=f"dataset: {', '.join(DATASETS)} (all but digits take a PATH), or "
        "the path of a .npy/.npz array",
    )
    parser.add_argument(
        "--binarize",
        choices=BINARIZE_MODES,
        default=None,
        help="how to binarize intensities in [0, 1]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders in Pyro.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a VAE and write a run folder")
    _add_data_args(train, ["digits"])
    train.add_argument("--guide", choices=sorted(GUIDES), default="full")
    train.add_argument(
        "--guide-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra guide argument, e.g. tril_scale=0.03",
    )
    train.add_argument("--latent-dim", type=_positive_int, default=16)
    train.add_argument(
        "--hidden-dims",
        type=_int_list,
        default=(200,),
        help="encoder widths, comma-separated; the decoder mirrors them",
    )
    train.add_argument("--epochs", type=_positive_int, default=300)
    train.add_argument("--batch-size", type=_positive_int, default=100)
    train.add_argument("--lr", type=_positive_float, default=1e-3)
    train.add_argument(
        "--num-particles", type=_positive_int, default=1, help="vectorized z draws per image"
    )
    train.add_argument("--jit", action="store_true", help="compile the loss (JitTrace_ELBO)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    train.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = commands.add_parser("evaluate", help="ELBO and IS log p(x) of a trained run")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--split", choices=("test", "valid", "train"), default="test")
    ev.add_argument("--num-samples", type=_positive_int, default=5000)
    ev.add_argument("--batch-size", type=_positive_int, default=100)
    _add_data_args(ev, None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = commands.add_parser("sample", help="decode prior samples into a PNG grid")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("-n", "--num-images", type=_positive_int, default=64)
    sample.add_argument("--out", type=Path, default=None)
    sample.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; an unavailable CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


def data_spec(values: Sequence[str], binarize: str | None, seed: int = 0) -> DataSpec:
    """``--data NAME [PATH]`` (or ``--data FILE.npy``) as a DataSpec."""
    if len(values) > 2:
        raise UsageError(f"--data takes NAME [PATH], got {' '.join(values)}")
    name, path = values[0], (values[1] if len(values) == 2 else None)
    if name not in DATASETS and path is None and Path(name).suffix in (".npy", ".npz"):
        name, path = "array", name
    if path is not None:
        path = str(Path(path).expanduser().resolve())
    return DataSpec(name, path, binarize, seed)


def _prepare_run_dir(
    out: Path | None, data: DataSpec, guide: str, overwrite: bool, write: bool = True
) -> Path:
    run_dir = out or Path("runs") / f"{data.name}-{guide}"
    if not write:  # another process owns the folder
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a folder")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise UsageError(
            f"--out {run_dir}: already holds a run ({', '.join(existing)}); "
            "pass --overwrite or choose another --out"
        )
    for name in existing:
        (run_dir / name).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def _read_run(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / CONFIG).is_file():
        raise UsageError(
            f"{run_dir}: not a run folder (no {CONFIG}); train one with "
            "pyro-vae train --out RUN_DIR"
        )
    try:
        return json.loads((run_dir / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{run_dir / CONFIG}: not valid JSON ({error})") from None


def _save_pictures(vae: VAE, valid: torch.Tensor, run_dir: Path) -> list[Path]:
    shape = vae.config.image_shape
    samples = vae.sample_images(64, generator=torch.Generator().manual_seed(0)).cpu()
    x = valid[:32]
    pairs = torch.stack(
        [x.reshape(-1, 8, x.shape[-1]), vae.reconstruct(x).reshape(-1, 8, x.shape[-1])], dim=1
    ).reshape(-1, 8, x.shape[-1])
    return [
        save_image_grid(run_dir / "samples.png", samples, shape),
        save_image_grid(run_dir / "reconstructions.png", pairs.cpu(), shape),
    ]


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    spec = data_spec(args.data, args.binarize)
    train_config = TrainConfig(
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_particles=args.num_particles,
        seed=args.seed,
        jit=args.jit,
    )
    data = load_dataset(spec)
    if args.batch_size > data.train.shape[0]:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the training set "
            f"({data.train.shape[0]} images)"
        )
    config = VAEConfig(
        data.data_dim,
        args.latent_dim,
        args.hidden_dims,
        args.guide,
        dict(args.guide_option),
        data.image_shape,
    )
    replica, device = init_replica(device)  # under torchrun: join the process group
    if args.jit and replica.world_size > 1:
        raise UsageError("--jit is not supported with several processes; drop --jit")
    pyro.set_rng_seed(args.seed)  # the same initial weights on every rank
    vae = VAE(config).to(device)  # guide options are checked here, before the folder exists
    pyro.set_rng_seed(args.seed + replica.rank)  # then each rank draws its own ELBO noise
    run_dir = _prepare_run_dir(args.out, spec, args.guide, args.overwrite, replica.is_main)
    if replica.is_main:
        _write_json(
            run_dir / CONFIG,
            {
                "version": __version__,
                "model": config.to_dict(),
                "train": vars(train_config),
                "data": vars(spec),
            },
        )
        print(
            f"training a {args.guide} VAE on {spec.name}: {data.train.shape[0]} train / "
            f"{data.valid.shape[0]} valid images of {data.data_dim} pixels, on {device}"
            + (f" and {replica.world_size - 1} more processes" if replica.world_size > 1 else ""),
            file=sys.stderr,
        )
    try:
        history = fit(vae, data, train_config, run_dir, not args.quiet, replica)
    except TrainingDiverged as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return 1
    if not replica.is_main:
        return 0
    vae, payload = load_checkpoint(run_dir / CHECKPOINT, map_location=device)
    pictures = _save_pictures(vae, data.valid.to(device), run_dir)
    print(
        f"best valid ELBO {payload['valid_elbo']:.3f} nats at epoch {payload['epoch']} of "
        f"{len(history)}"
    )
    for path in (run_dir / CONFIG, run_dir / CHECKPOINT, run_dir / METRICS, *pictures):
        print(f"  wrote {path}")
    print(f"next: pyro-vae evaluate {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run = _read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT, map_location=device)
    if args.data is not None:
        spec = data_spec(args.data, args.binarize)
    else:
        spec = DataSpec(**run["data"])
    x = load_dataset(spec).split(args.split)
    if x.shape[1] != vae.config.data_dim:
        raise UsageError(
            f"the data has {x.shape[1]} pixels per image but the checkpoint "
            f"expects {vae.config.data_dim}"
        )
    pyro.set_rng_seed(args.seed)
    result = evaluate(
        vae,
        x.to(device),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({**result.to_dict(), "split": args.split}))
        return 0
    print(
        f"{args.split} split, {result.num_points} images, K = {result.num_samples} "
        "importance samples (nats per image)"
    )
    for label, value in (
        ("ELBO", result.elbo),
        ("reconstruction E_q log p(x|z)", result.reconstruction),
        ("KL(q(z|x) || p(z))", result.kl),
        ("IS log p(x)", result.log_likelihood),
        ("gap log p(x) - ELBO", result.gap),
    ):
        print(f"  {label:<32}{value:10.3f}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    _read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT)
    out = args.out or args.run_dir / f"samples-{args.num_images}.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the picture is written as PNG; use a .png name")
    images = vae.sample_images(args.num_images, generator=torch.Generator().manual_seed(args.seed))
    print(f"wrote {save_image_grid(out, images, vae.config.image_shape)}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input).

    A ``torchrun`` worker leaves its process group and exits here instead of returning.
    """
    return finish_worker(_run(argv))


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, DataError, CheckpointError) as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # invalid settings caught by the library's constructors
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
