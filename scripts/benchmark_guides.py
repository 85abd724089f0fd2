"""Train every guide at equal epochs and seed; tabulate ELBO, IS log p(x), gap and s/epoch.

Example::

    python scripts/benchmark_guides.py --data digits --epochs 100 --out digits.md
    python scripts/benchmark_guides.py --data binarized-mnist binarized_mnist.npz \
        --epochs 5 --latent-dim 32 --hidden-dims 400 --num-points 1000 --out mnist.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import VAE, TrainConfig, VAEConfig, evaluate, fit, load_dataset
from pyro_vae.cli import data_spec
from pyro_vae.guides import GUIDES, FlowGuide

__all__ = ["main", "run_guide"]

DEFAULT_GUIDES = ("diagonal", "full", "iaf", "planar", "radial", "spline", "sylvester")
COLUMNS = (
    "guide",
    "ELBO",
    "IS log p(x)",
    "gap",
    "valid ELBO, all images",
    "s/epoch",
    "guide parameters",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits"], metavar=("NAME", "PATH"))
    parser.add_argument("--guides", nargs="+", default=list(DEFAULT_GUIDES), choices=GUIDES)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[200])
    parser.add_argument("--num-flows", type=int, default=4)
    parser.add_argument("--flow-hidden-dims", type=int, nargs="+", default=None)
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the IS estimate")
    parser.add_argument(
        "--num-points", type=int, default=None, help="evaluate on the first N valid images"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="markdown table to write")
    return parser


def run_guide(key: str, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Train one guide from seed ``args.seed`` and evaluate it on the validation subset."""
    options: dict[str, Any] = {}
    if issubclass(GUIDES[key], FlowGuide):
        options["num_flows"] = args.num_flows
        if args.flow_hidden_dims:
            options["flow_hidden_dims"] = tuple(args.flow_hidden_dims)
    config = VAEConfig(
        data.data_dim, args.latent_dim, tuple(args.hidden_dims), key, options, data.image_shape
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(config)
    train = TrainConfig(args.epochs, args.batch_size, args.lr, seed=args.seed)
    history = fit(vae, data, train, progress=False)
    x = data.split("valid")[: args.num_points]
    pyro.set_rng_seed(args.seed)
    result = evaluate(vae, x, num_samples=args.num_samples, batch_size=args.batch_size)
    return {
        "guide": key,
        "ELBO": result.elbo,
        "IS log p(x)": result.log_likelihood,
        "gap": result.gap,
        "valid ELBO, all images": history[-1]["valid_elbo"],
        "s/epoch": sum(row["seconds"] for row in history) / len(history),
        "guide parameters": sum(p.numel() for p in vae.encoder.parameters()),
        "num_points": result.num_points,
        "options": options,
    }


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table in nats per image.

    ELBO, IS log p(x) and gap use the same K draws on the evaluated images; "valid ELBO, all
    images" is the last epoch's one-draw ELBO over the whole validation split; s/epoch
    includes that pass.
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row["guide"]] + [f"{row[c]:.2f}" for c in COLUMNS[1:-1]]
        cells.append(f"{row[COLUMNS[-1]]:,}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(data_spec(args.data, None))
    rows = []
    for key in args.guides:
        print(f"training {key}", file=sys.stderr, flush=True)
        rows.append(run_guide(key, data, args))
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(markdown(rows))  # partial tables survive an interrupted run
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
