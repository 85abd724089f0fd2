"""Variance and signal-to-noise ratio of the encoder's gradient under each estimator.

Usage: python scripts/gradient_variance.py RUN_DIR [--num-points 100] [--num-draws 50]
       [--copies 10] [--split test] [--num-particles 1,5,50] [--out PNG] [--snr-out PNG]
       [--seed 0]

At the trained parameters of RUN_DIR, draws single-sample gradients with respect to every
encoder parameter and, with the same number of draws per estimator, reports per parameter
tensor the mean per-element variance and signal-to-noise ratio |E g| / sd(g):

- the ELBO (one z per image): pathwise (reparameterized), score function (reparameterization
  turned off, so Pyro builds the score-function surrogate) and STL (sticking the landing);
- the K-sample IWAE bound for each K of --num-particles: the standard gradient and DReG.

Prints the pathwise/score table first (as before), then the ELBO and IWAE tables; saves a bar
chart of the ELBO variances (--out, default RUN_DIR/gradient_variance.png) and the encoder
SNR against K (--snr-out, default RUN_DIR/gradient_snr.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, DataSpec, load_checkpoint, load_dataset
from pyro_vae.objectives import GradientMoments, encoder_gradient_moments
from pyro_vae.run_dir import RunDir


def _table(moments: dict[str, GradientMoments]) -> list[dict[str, object]]:
    """One row per encoder tensor (and one for all): mean |g|, per-element variance and SNR."""
    pathwise = moments["pathwise"]
    rows = []
    for name, var in pathwise.variance.items():
        row = {
            "parameter": name,
            "elements": var.numel(),
            "mean_abs_gradient": float(pathwise.mean[name].abs().mean()),
        }
        for key, m in moments.items():
            row[f"{key}_variance"] = float(m.variance[name].mean())
            row[f"{key}_snr"] = float(m.snr()[name].mean())
        rows.append(row)
    total = sum(r["elements"] for r in rows)
    overall = {"parameter": "all encoder parameters", "elements": total}
    for key in rows[0]:
        if key not in overall:
            overall[key] = sum(r[key] * r["elements"] for r in rows) / total
    rows.append(overall)
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
        (-0.27, "stl_variance", "STL"),
        (0.0, "pathwise_variance", "pathwise"),
        (0.27, "score_variance", "score function"),
    ):
        ax.bar(positions + offset, [r[key] for r in rows], width=0.27, label=label)
    ax.set_yscale("log")
    ax.set_xticks(positions.tolist(), names, rotation=45, ha="right")
    ax.set_ylabel("mean per-element gradient variance")
    ax.set_title("Encoder gradient variance at the trained parameters")
    ax.legend()
    figure.savefig(path, format="png", dpi=120)


def _print_elbo_table(rows: list[dict[str, object]]) -> None:
    print("ELBO, one z per image: per-element variance and mean SNR |E g| / sd(g) per estimator")
    print(
        f"{'parameter':<26}{'var score':>11}{'var path':>11}{'var STL':>11}"
        f"{'SNR score':>11}{'SNR path':>11}{'SNR STL':>11}"
    )
    for r in rows:
        name = str(r["parameter"]).replace("all encoder parameters", "encoder (all)")
        print(
            f"{name:<26}{r['score_variance']:>11.3g}{r['pathwise_variance']:>11.3g}"
            f"{r['stl_variance']:>11.3g}{r['score_snr']:>11.3g}{r['pathwise_snr']:>11.3g}"
            f"{r['stl_snr']:>11.3g}"
        )


def _print_iwae_table(tables: dict[int, list[dict[str, object]]]) -> None:
    print("IWAE bound, K z per image: per-element variance and mean SNR of d(-L_K/B)/d(encoder)")
    print(
        f"{'K':<6}{'parameter':<26}{'var IWAE':>11}{'var DReG':>11}{'SNR IWAE':>11}"
        f"{'SNR DReG':>11}"
    )
    for k, rows in tables.items():
        for r in rows:
            name = str(r["parameter"]).replace("all encoder parameters", "encoder (all)")
            print(
                f"K={k:<4}{name:<26}{r['pathwise_variance']:>11.3g}{r['dreg_variance']:>11.3g}"
                f"{r['pathwise_snr']:>11.3g}{r['dreg_snr']:>11.3g}"
            )


def _plot_snr(tables: dict[int, list[dict[str, object]]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.add_subplot()
    ks = list(tables)
    names = [r["parameter"] for r in tables[ks[0]]]
    for key, label, color in (("pathwise_snr", "IWAE", "C0"), ("dreg_snr", "DReG", "C3")):
        for name in names:
            values = [next(r[key] for r in tables[k] if r["parameter"] == name) for k in ks]
            overall = name == "all encoder parameters"
            ax.plot(
                ks,
                values,
                color=color,
                marker="o" if overall else None,
                linewidth=2.5 if overall else 0.7,
                alpha=1.0 if overall else 0.35,
                label=f"{label}, all encoder parameters" if overall else None,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (importance samples per image)")
    ax.set_ylabel("mean per-element SNR |E g| / sd(g)")
    ax.set_title("Encoder gradient SNR of the IWAE bound\n(thin lines: one parameter tensor each)")
    ax.legend()
    figure.savefig(path, format="png", dpi=120)


def _moments(
    vae: VAE, x: torch.Tensor, args: argparse.Namespace, estimator: str, **kw: object
) -> GradientMoments:
    pyro.set_rng_seed(args.seed)
    return encoder_gradient_moments(vae, x, args.num_draws, estimator, args.copies, **kw)


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,5,50, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num-points", type=int, default=100)
    parser.add_argument("--num-draws", type=int, default=50, help="calls per estimator")
    parser.add_argument("--copies", type=int, default=10, help="independent draws per call")
    parser.add_argument("--split", choices=("test", "valid", "train"), default="test")
    parser.add_argument("--num-particles", type=_int_list, default=[1, 5, 50], help="IWAE K")
    parser.add_argument("--out", type=Path, default=None, help="variance plot (PNG)")
    parser.add_argument("--snr-out", type=Path, default=None, help="SNR-vs-K plot (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config_file = RunDir(args.run_dir).config
    if not config_file.is_file():
        print(f"gradient_variance: error: {args.run_dir}: no config.json", file=sys.stderr)
        return 2
    run = json.loads(config_file.read_text())
    vae, _ = load_checkpoint(RunDir(args.run_dir).checkpoint)
    x = load_dataset(DataSpec(**run["data"])).split(args.split)[: args.num_points]
    moments = {e: _moments(vae, x, args, e) for e in ("pathwise", "score", "stl")}
    rows = _table(moments)
    _print_table(rows, moments["pathwise"].num_draws, x.shape[0])
    _print_elbo_table(rows)
    tables = {
        k: _table(
            {
                e: _moments(vae, x, args, e, objective="iwae", num_particles=k)
                for e in ("pathwise", "dreg")
            }
        )
        for k in args.num_particles
    }
    _print_iwae_table(tables)
    out = args.out or args.run_dir / "gradient_variance.png"
    snr_out = args.snr_out or args.run_dir / "gradient_snr.png"
    _plot(rows, out)
    _plot_snr(tables, snr_out)
    print(f"wrote {out} and {snr_out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
