"""Pictures: grids of images written as PNG files (no pyplot global state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write

__all__ = ["save_image_grid", "tile"]


def tile(images: Tensor, image_shape: tuple[int, int], border: int = 1) -> np.ndarray:
    """Arrange images ``(R, C, P)`` with values in [0, 1] into one ``(H, W)`` array.

    Cells are separated by ``border`` pixels of mid-grey.
    """
    if images.dim() != 3:
        raise ValueError(f"images must have shape (rows, cols, pixels), got {tuple(images.shape)}")
    rows, cols, _ = images.shape
    h, w = image_shape
    cells = images.detach().float().cpu().clamp(0, 1).reshape(rows, cols, h, w)
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
) -> Path:
    """Write images ``(n, P)`` (or ``(R, C, P)``) as a grey PNG grid; returns the path.

    Pixel values in ``value_range`` (low, high) map to black..white (e.g. ``(0, 16)`` for
    binomial means of 17-level images); None uses the images' own smallest and largest
    values. Small images are enlarged by whole-pixel repetition so the file is at least
    ``min_size`` pixels wide.
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
        pad = images.new_ones(rows * columns - n, images.shape[1])
        images = torch.cat([images, pad]).reshape(rows, columns, -1)
    grid = tile(images, image_shape)
    factor = max(1, math.ceil(min_size / grid.shape[1]))
    grid = np.kron(grid, np.ones((factor, factor)))
    path = Path(path)
    atomic_write(path, lambda tmp: imsave(tmp, grid, cmap="gray", vmin=0, vmax=1, format="png"))
    return path
