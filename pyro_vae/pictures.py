"""Pictures: grids of images written as PNG files (no pyplot global state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write
from .run_dir import RunDir, best_index

__all__ = ["read_metrics", "save_curves", "save_image_grid", "tile"]


def tile(images: Tensor, image_shape: tuple[int, int], border: int = 1) -> np.ndarray:
    """Arrange images ``(R, C, P)`` with values in [0, 1] into one ``(H, W)`` array.

    Cells are separated by ``border`` pixels of mid-grey; NaN pixels (an empty cell) are
    mid-grey too.
    """
    if images.dim() != 3:
        raise ValueError(f"images must have shape (rows, cols, pixels), got {tuple(images.shape)}")
    rows, cols, _ = images.shape
    h, w = image_shape
    cells = images.detach().float().cpu().clamp(0, 1).reshape(rows, cols, h, w)
    cells = cells.nan_to_num(0.5)  # empty cells (NaN) take the border's grey
    out = torch.full((rows * (h + border) + border, cols * (w + border) + border), 0.5)
    for r in range(rows):
        for c in range(cols):
            top, left = border + r * (h + border), border + c * (w + border)
            out[top : top + h, left : left + w] = cells[r, c]
    return out.numpy()


def save_image_grid(
    path: str | Path,
    images: Tensor,
    image_shape: tuple[int, int],
    columns: int | None = None,
    min_size: int = 256,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write images ``(n, P)`` (or ``(R, C, P)``) as a grey PNG grid; returns the path.

    ``(n, P)`` images fill rows of ``columns`` (default about sqrt(n)); the cells left over in
    the last row stay empty (background grey), never white images.

    Pixel values in ``value_range`` (low, high) map to black..white (e.g. ``(0, 16)`` for
    binomial means of 17-level images); None uses the images' own smallest and largest
    values. Small images are enlarged by whole-pixel repetition so the file is at least
    ``min_size`` pixels wide. With a ``title`` or ``row_labels`` (one per row of the grid)
    the grid is drawn as a figure with those words around it.
    """
    from matplotlib.image import imsave

    images = images.detach().float().cpu()
    low, high = value_range or (float(images.min()), float(images.max()))
    if (low, high) != (0.0, 1.0):
        images = (images - low) / max(high - low, 1e-12)

    if images.dim() == 2:
        n = images.shape[0]
        columns = columns or math.ceil(math.sqrt(n))
        rows = math.ceil(n / columns)
        pad = images.new_full((rows * columns - n, images.shape[1]), float("nan"))  # no cell
        images = torch.cat([images, pad]).reshape(rows, columns, -1)
    grid = tile(images, image_shape)
    path = Path(path)
    if title is not None or row_labels is not None:
        figure = _labelled_figure(grid, images.shape[0], image_shape, title, row_labels)
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
        return path
    factor = max(1, math.ceil(min_size / grid.shape[1]))
    grid = np.kron(grid, np.ones((factor, factor)))
    atomic_write(path, lambda tmp: imsave(tmp, grid, cmap="gray", vmin=0, vmax=1, format="png"))
    return path


def _labelled_figure(
    grid: np.ndarray,
    rows: int,
    image_shape: tuple[int, int],
    title: str | None,
    row_labels: Sequence[str] | None,
) -> Any:  # noqa: ANN401 (a matplotlib Figure)
    """The tiled ``grid`` in a figure with a title and a label left of each row."""
    from matplotlib.figure import Figure

    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels must name the {rows} rows, got {len(row_labels)}")
    width = 6.0
    height = width * grid.shape[0] / grid.shape[1] + (0.5 if title else 0.2)
    margin = 1.4 if row_labels else 0.1
    figure = Figure(figsize=(width + margin, height), dpi=100)
    ax = figure.add_axes((margin / (width + margin), 0.02, width / (width + margin), 0.9))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    step = image_shape[0] + 1
    if row_labels:
        ax.set_yticks([1 + step * r + image_shape[0] / 2 - 0.5 for r in range(rows)])
        ax.set_yticklabels(row_labels, fontsize=8)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return figure


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    """Columns ``epoch``, ``train_elbo``, ``valid_elbo`` of ``run_dir/metrics.csv``
    (:meth:`~pyro_vae.run_dir.RunDir.read_metrics`)."""
    return RunDir(run_dir).read_metrics()


def save_curves(
    runs: dict[str, dict[str, list[float]]], path: str | Path, floor: float | None = None
) -> Path:
    """Draw runs' curves (from :func:`read_metrics`, by label) into one PNG; returns its path.

    The validation ELBO is solid with the checkpoint's epoch marked (its best, or that of the
    best validation IWAE bound), the train objective dashed, one colour per run; ``floor``
    cuts the y axis below (None: the lowest validation ELBO).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    for colour, (label, m) in zip(colormaps["tab10"].colors, runs.items(), strict=False):
        ax.plot(m["epoch"], m["valid_elbo"], color=colour, label=f"{label} (valid)")
        ax.plot(m["epoch"], m["train_elbo"], color=colour, linestyle="--", alpha=0.6)
        best = best_index(m)  # the checkpoint's epoch
        ax.plot(m["epoch"][best], m["valid_elbo"][best], "o", color=colour)
    # the top follows the validation curves and the final train values: a KL warm-up's
    # early train objective is no ELBO and would squeeze the curves that matter
    top = max(max(*m["valid_elbo"], m["train_elbo"][-1]) for m in runs.values())
    bottom = floor if floor is not None else min(min(m["valid_elbo"]) for m in runs.values())
    ax.set_ylim(bottom, top + 0.05 * (top - bottom) + 1e-9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per image (nats)")
    ax.set_title("validation ELBO (solid, best marked) and train objective (dashed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
