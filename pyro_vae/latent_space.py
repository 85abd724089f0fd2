"""Pictures of a trained model's latent space: codes in 2-D, interpolations, traversals."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import atomic_write
from .model import VAE
from .pictures import save_image_grid
from .run_dir import RunDir

__all__ = [
    "interpolation_grid",
    "project_2d",
    "save_latent_pictures",
    "save_latent_scatter",
    "traversal_grid",
]


def project_2d(codes: Tensor) -> tuple[Tensor, tuple[str, str]]:
    """Codes ``(N, D)`` as points ``(N, 2)`` and the axes' names.

    D = 2: the two coordinates; D = 1: the coordinate against 0; else the first two
    principal components of the centred codes, named with their share of the variance.
    """
    if codes.shape[-1] == 1:
        return torch.cat([codes, torch.zeros_like(codes)], -1), ("z_1", "")
    if codes.shape[-1] == 2:
        return codes, ("z_1", "z_2")
    centred = codes - codes.mean(0)
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    share = singular**2 / (singular**2).sum()
    names = tuple(f"PC {i + 1} ({100 * float(share[i]):.0f}% of variance)" for i in range(2))
    return centred @ vt[:2].T, names


def save_latent_scatter(
    codes: Tensor, path: str | Path, labels: Tensor | None = None, title: str = ""
) -> Path:
    """Scatter codes ``(N, D)`` in 2-D (:func:`project_2d`), coloured by ``labels`` ``(N,)``."""
    from matplotlib.figure import Figure

    points, (x_name, y_name) = project_2d(codes.detach().float().cpu())
    fig = Figure(figsize=(6, 5), dpi=120)
    ax = fig.subplots()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6)
    else:
        labels = labels.cpu()
        for value in labels.unique().tolist():
            chosen = labels == value
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, label=str(value))
        ax.legend(title="label", markerscale=2, fontsize="small", loc="best")
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(title or "posterior means of the images")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


@torch.no_grad()
def interpolation_grid(
    vae: VAE, starts: Tensor, ends: Tensor, steps: int = 10, condition: Tensor | None = None
) -> Tensor:
    """Decoded means along straight lines between codes, ``(R, steps, P)``.

    Row r runs from the code of image ``starts[r]`` to that of ``ends[r]`` (images ``(R, P)``);
    ``condition`` ``(R, C)`` conditions both ends and the decoder.
    """
    a, b = vae.encode(starts, condition), vae.encode(ends, condition)  # (R, D)
    weights = torch.linspace(0, 1, steps, device=a.device)[None, :, None]
    path = (1 - weights) * a[:, None] + weights * b[:, None]  # (R, steps, D)
    cond = None if condition is None else condition[:, None].expand(-1, steps, -1)
    return vae.decode(path, cond)


@torch.no_grad()
def traversal_grid(
    vae: VAE,
    codes: Tensor,
    num_dims: int = 10,
    values: Tensor | None = None,
    condition: Tensor | None = None,
) -> tuple[Tensor, list[int]]:
    """Decoded means as one latent dimension moves, the others at the codes' mean.

    The ``num_dims`` dimensions whose codes ``(N, D)`` vary most each take a row; along it
    the dimension runs over its mean plus ``values`` times its standard deviation (default
    -3 .. 3 in 9 steps). Returns the images ``(rows, steps, P)`` and the dimensions shown.
    ``condition`` ``(C,)`` conditions the decoder.
    """
    values = torch.linspace(-3, 3, 9) if values is None else values
    values = values.to(codes.device, codes.dtype)
    mean = codes.mean(0)
    spread = codes.std(0) if codes.shape[0] > 1 else torch.ones_like(mean)
    dims = spread.argsort(descending=True)[:num_dims].tolist()
    grid = mean.expand(len(dims), len(values), -1).clone()  # (rows, steps, D)
    for row, dim in enumerate(dims):
        grid[row, :, dim] = mean[dim] + values * spread[dim]
    cond = None if condition is None else condition.expand(len(dims), len(values), -1)
    return vae.decode(grid, cond), dims


def save_latent_pictures(
    vae: VAE,
    x: Tensor,
    out_dir: str | Path,
    labels: Tensor | None = None,
    condition: Tensor | None = None,
) -> list[Path]:
    """``latent.png``, ``interpolation.png`` and ``traversal.png`` for the images x ``(N, P)``.

    ``labels`` ``(N,)`` colour the scatter; ``condition`` ``(N, C)`` conditions a
    conditional VAE (the traversal takes the first image's).
    """
    out_dir = Path(out_dir)
    was_training = vae.training
    vae.eval()
    try:
        codes = vae.encode(x, condition)
        span = vae.likelihood.value_range() or (float(x.min()), float(x.max()))
        shape = vae.config.image_shape
        pairs = min(6, x.shape[0] // 2)
        c = None if condition is None else condition[:pairs]
        lines = interpolation_grid(vae, x[:pairs], x[pairs : 2 * pairs], 10, c)
        moves, _ = traversal_grid(vae, codes, condition=None if c is None else c[0])
    finally:
        vae.train(was_training)
    sizes = ",".join(map(str, vae.config.latent_dims))
    return [
        save_latent_scatter(
            codes, out_dir / RunDir.LATENT, labels, f"posterior means, z_1 of {sizes}"
        ),
        save_image_grid(out_dir / RunDir.INTERPOLATION, lines.cpu(), shape, value_range=span),
        save_image_grid(out_dir / RunDir.TRAVERSAL, moves.cpu(), shape, value_range=span),
    ]
