"""Plot the per-epoch train and validation ELBO of one or more run folders into one PNG.

Reads each ``RUN_DIR/metrics.csv`` (written by ``pyro-vae train``) and draws the validation
ELBO as a solid line and the train objective as a dashed one, one colour per run, with the
best validation epoch marked.

    python scripts/plot_metrics.py runs/mlp-diagonal runs/mlp-iaf --out curves.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["main", "read_metrics"]


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    """Columns ``epoch``, ``train_elbo``, ``valid_elbo`` of ``run_dir/metrics.csv``."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a run folder?)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no epochs recorded yet")
    keys = ("epoch", "train_elbo", "valid_elbo")
    return {key: [float(row[key]) for row in rows] for key in keys}


def plot(runs: dict[str, dict[str, list[float]]], out: Path, floor: float | None) -> Path:
    """Draw every run's curves into ``out``; ``floor`` cuts the y axis below (None: auto)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for colour, (label, m) in zip(plt.cm.tab10.colors, runs.items(), strict=False):
        ax.plot(m["epoch"], m["valid_elbo"], color=colour, label=f"{label} (valid)")
        ax.plot(m["epoch"], m["train_elbo"], color=colour, linestyle="--", alpha=0.6)
        best = max(range(len(m["epoch"])), key=m["valid_elbo"].__getitem__)
        ax.plot(m["epoch"][best], m["valid_elbo"][best], "o", color=colour)
    # the top follows the validation curves and the final train values: a KL warm-up's
    # early train objective is no ELBO and would squeeze the curves that matter
    top = max(max(*m["valid_elbo"], m["train_elbo"][-1]) for m in runs.values())
    bottom = floor if floor is not None else min(min(m["valid_elbo"]) for m in runs.values())
    ax.set_ylim(bottom, top + 0.05 * (top - bottom) + 1e-9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per image (nats)")
    ax.set_title("validation ELBO (solid, best marked) and train objective (dashed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--floor", type=float, default=None, help="lowest ELBO shown")
    args = parser.parse_args(argv)
    try:
        runs = {run.name: read_metrics(run) for run in args.run_dirs}
    except (OSError, ValueError, KeyError) as error:
        print(f"plot_metrics: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {plot(runs, args.out, args.floor)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
