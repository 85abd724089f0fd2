"""Train one recipe on binarized MNIST, keep the best-validation model, report its IS NLL.

Runs ``pyro-vae train`` with the given preset, guide and flags (flags after ``--`` go to it
unchanged), reloads ``checkpoint.pt`` (the epoch of the best validation ELBO), and estimates
the validation NLL = -log p(x) with K importance samples, the ELBO and the gap from the same
draws. Prints one JSON line and a markdown row; ``--table FILE`` appends the row.

Example::

    python scripts/benchmark_quality.py --preset mnist-mlp --guide iaf --table quality.md
    python scripts/benchmark_quality.py --preset mnist-vamp --data binarized_mnist.npz \
        --epochs 5 --num-points 500 --num-samples 1000 -- --lr 3e-4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import evaluate, load_dataset
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.cli import main as cli_main
from pyro_vae.data import DataSpec
from pyro_vae.guides import GUIDES
from pyro_vae.presets import PRESETS
from pyro_vae.run_dir import RunDir

__all__ = ["COLUMNS", "main", "markdown_row"]

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"
COLUMNS = (
    "recipe",
    "guide",
    "epochs",
    "best epoch",
    "valid NLL",
    "valid ELBO",
    "gap",
    "K",
    "images",
    "train s",
    "eval s",
    "command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="binarized MNIST .npz")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--guide", choices=sorted(GUIDES), default=None)
    parser.add_argument("--epochs", type=int, default=None, help="cap the training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the IS estimate")
    parser.add_argument(
        "--num-points", type=int, default=None, help="evaluate the first N valid images"
    )
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/...)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--table", type=Path, default=None, help="markdown file to append to")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def train_command(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The ``pyro-vae`` arguments that train this recipe."""
    out = args.out or Path("runs") / f"quality-{args.preset or 'flags'}-{args.guide or 'default'}"
    argv = ["train", "--data", "binarized-mnist", str(args.data), "--out", str(out)]
    argv += ["--seed", str(args.seed), "--quiet"]
    for flag, value in (("--preset", args.preset), ("--guide", args.guide)):
        if value is not None:
            argv += [flag, value]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.overwrite:
        argv.append("--overwrite")
    return argv + list(extra)


def score(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """IS NLL, ELBO and gap of the run's best checkpoint on the first validation images."""
    vae, payload = load_checkpoint(RunDir(run_dir).checkpoint)
    spec = DataSpec(**json.loads(RunDir(run_dir).config.read_text())["data"])
    x = load_dataset(spec).split("valid")[: args.num_points]
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    result = evaluate(vae, x, num_samples=args.num_samples, batch_size=args.eval_batch_size)
    return {
        "guide": vae.config.guide,
        "best epoch": payload["epoch"],
        "valid NLL": -result.log_likelihood,
        "valid ELBO": result.elbo,
        "gap": result.gap,
        "K": result.num_samples,
        "images": result.num_points,
        "eval s": time.perf_counter() - start,
    }


def markdown_row(row: dict[str, Any]) -> str:
    """One table row: nats per image, seconds of wall time, the command in backticks."""
    cells = []
    for column in COLUMNS:
        value = row[column]
        if column == "command":
            cells.append(f"`{value}`")
        elif isinstance(value, float):
            cells.append(f"{value:.2f}" if column.endswith(" s") else f"{value:.3f}")
        else:
            cells.append(str(value))
    return "| " + " | ".join(cells) + " |"


def _header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = train_command(args, [word for word in extra if word != "--"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout keeps the result only
        status = cli_main(command)
    if status != 0:
        return status
    run_dir = Path(command[command.index("--out") + 1])
    with open(RunDir(run_dir).metrics) as handle:
        epochs = sum(1 for _ in handle) - 1
    row = {
        "recipe": args.preset or "flags",
        "epochs": epochs,
        "train s": time.perf_counter() - start,
        **score(run_dir, args),
        "command": "pyro-vae " + shlex.join(command),
    }
    print(json.dumps(row), flush=True)
    print(_header() + markdown_row(row))
    if args.table is not None:
        new = not args.table.exists() or args.table.stat().st_size == 0
        with open(args.table, "a") as handle:
            handle.write((_header() if new else "") + markdown_row(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
