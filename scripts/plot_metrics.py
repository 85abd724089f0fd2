"""Plot the per-epoch train and validation ELBO of one or more run folders into one PNG.

Reads each ``RUN_DIR/metrics.csv`` (written by ``pyro-vae train``) and draws the validation
ELBO as a solid line and the train objective as a dashed one, one colour per run, with the
best validation epoch marked.

    python scripts/plot_metrics.py runs/mlp-diagonal runs/mlp-iaf --out curves.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pyro_vae.pictures import read_metrics, save_curves

__all__ = ["main", "read_metrics"]


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
    print(f"wrote {save_curves(runs, args.out, args.floor)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
