"""Variance of the encoder's ELBO gradient: pathwise vs score-function estimator.

Usage: python scripts/gradient_variance.py RUN_DIR [--num-points 100] [--num-draws 50]
       [--copies 10] [--split test] [--out PNG] [--seed 0]

At the trained parameters of RUN_DIR, draws single-sample gradients of -ELBO / B with respect
to every encoder parameter, once reparameterized (pathwise) and once with reparameterization
turned off so Pyro builds the score-function surrogate, with the same number of draws; prints
per parameter tensor the mean per-element variance of each and their ratio, and saves a bar
chart (log scale).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyro_vae import DataSpec, load_checkpoint, load_dataset
from pyro_vae.objectives import GradientMoments, encoder_gradient_moments


def _table(moments: dict[str, GradientMoments]) -> list[dict[str, object]]:
    pathwise, score = moments["pathwise"], moments["score"]
    rows = []
    for name, var in pathwise.variance.items():
        rows.append(
            {
                "parameter": name,
                "elements": var.numel(),
                "mean_abs_gradient": float(pathwise.mean[name].abs().mean()),
                "pathwise_variance": float(var.mean()),
                "score_variance": float(score.variance[name].mean()),
            }
        )
    total = sum(r["elements"] for r in rows)
    rows.append(
        {
            "parameter": "all encoder parameters",
            "elements": total,
            "mean_abs_gradient": sum(r["mean_abs_gradient"] * r["elements"] for r in rows) / total,
            "pathwise_variance": sum(r["pathwise_variance"] * r["elements"] for r in rows) / total,
            "score_variance": sum(r["score_variance"] * r["elements"] for r in rows) / total,
        }
    )
    return rows


def _print_table(rows: list[dict[str, object]], num_draws: int, num_points: int) -> None:
    print(
        f"per-element variance of d(-ELBO/B)/d(encoder), B = {num_points} images, "
        f"{num_draws} single-sample draws per estimator"
    )
    print(
        f"{'parameter':<26}{'elements':>9}{'mean |g|':>11}{'pathwise':>12}{'score':>12}"
        f"{'score/path':>12}"
    )
    for r in rows:
        ratio = r["score_variance"] / max(r["pathwise_variance"], 1e-300)
        print(
            f"{r['parameter']:<26}{r['elements']:>9}{r['mean_abs_gradient']:>11.3g}"
            f"{r['pathwise_variance']:>12.3g}{r['score_variance']:>12.3g}{ratio:>12.3g}"
        )


def _plot(rows: list[dict[str, object]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6, 0.9 * len(rows) + 2), 4.5), layout="constrained")
    ax = figure.add_subplot()
    names = [str(r["parameter"]).replace("all encoder parameters", "all") for r in rows]
    positions = torch.arange(len(rows), dtype=torch.float64)
    for offset, key, label in (
        (-0.2, "pathwise_variance", "pathwise"),
        (0.2, "score_variance", "score function"),
    ):
        ax.bar(positions + offset, [r[key] for r in rows], width=0.4, label=label)
    ax.set_yscale("log")
    ax.set_xticks(positions.tolist(), names, rotation=45, ha="right")
    ax.set_ylabel("mean per-element gradient variance")
    ax.set_title("Encoder gradient variance at the trained parameters")
    ax.legend()
    figure.savefig(path, format="png", dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num-points", type=int, default=100)
    parser.add_argument("--num-draws", type=int, default=50, help="calls per estimator")
    parser.add_argument("--copies", type=int, default=10, help="independent draws per call")
    parser.add_argument("--split", choices=("test", "valid", "train"), default="test")
    parser.add_argument("--out", type=Path, default=None, help="plot (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config_file = args.run_dir / "config.json"
    if not config_file.is_file():
        print(f"gradient_variance: error: {args.run_dir}: no config.json", file=sys.stderr)
        return 2
    run = json.loads(config_file.read_text())
    vae, _ = load_checkpoint(args.run_dir / "checkpoint.pt")
    x = load_dataset(DataSpec(**run["data"])).split(args.split)[: args.num_points]
    moments = {}
    for estimator in ("pathwise", "score"):
        pyro.set_rng_seed(args.seed)
        moments[estimator] = encoder_gradient_moments(
            vae, x, args.num_draws, estimator, copies=args.copies
        )
    rows = _table(moments)
    _print_table(rows, moments["pathwise"].num_draws, x.shape[0])
    out = args.out or args.run_dir / "gradient_variance.png"
    _plot(rows, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
