"""Latent-space pictures: the 2-D projection, interpolations and traversals, checked exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pyro_vae import VAE, VAEConfig
from pyro_vae.cli import main
from pyro_vae.latent_space import interpolation_grid, project_2d, traversal_grid

D = 4


def _identity_vae() -> VAE:
    """P = D and a decoder that copies z: a decoded Bernoulli mean is sigmoid(z), invertible."""
    decoder = nn.Linear(D, D)
    with torch.no_grad():
        decoder.weight.copy_(torch.eye(D))
        decoder.bias.zero_()
    return VAE(VAEConfig(D, D, (8,), "diagonal"), decoder=decoder).double().eval()


def test_projection_keeps_two_axes_or_takes_the_principal_components(float64: None) -> None:
    codes = torch.randn(500, 2)
    assert torch.equal(project_2d(codes)[0], codes)
    mixing = torch.tensor([[3.0, 0, 0, 0, 0], [0, 1.5, 0, 0, 0], [0, 0, 0.5, 0.2, 0.1]])
    codes = torch.randn(2000, 3) @ mixing  # (N, 5)
    points, names = project_2d(codes)
    covariance = torch.cov((codes - codes.mean(0)).T)
    top = torch.linalg.eigvalsh(covariance).flip(0)[:2]
    assert torch.allclose(torch.cov(points.T).diagonal(), top, rtol=1e-8)
    assert abs(float(torch.cov(points.T)[0, 1])) < 1e-8  # uncorrelated axes
    assert names[0].startswith("PC 1 (") and "% of variance" in names[1]


def test_interpolation_runs_straight_between_the_two_codes(float64: None) -> None:
    vae = _identity_vae()
    starts, ends = torch.rand(3, D).round(), torch.rand(3, D).round()
    grid = interpolation_grid(vae, starts, ends, steps=5)
    assert grid.shape == (3, 5, D)
    codes = torch.logit(grid)  # back through sigmoid: the codes on each line
    a, b = vae.encode(starts), vae.encode(ends)
    expected = a[:, None] + torch.linspace(0, 1, 5)[None, :, None] * (b - a)[:, None]
    assert torch.allclose(codes, expected, atol=1e-9)


def test_traversal_moves_one_dimension_per_row(float64: None) -> None:
    vae = _identity_vae()
    codes = torch.randn(200, D) * torch.tensor([0.1, 2.0, 0.5, 1.0])
    values = torch.tensor([-2.0, 0.0, 2.0])
    grid, dims = traversal_grid(vae, codes, num_dims=3, values=values)
    assert dims == [1, 3, 2]  # by spread
    inputs = torch.logit(grid)  # (rows, steps, D)
    mean, spread = codes.mean(0), codes.std(0)
    for row, dim in enumerate(dims):
        others = [d for d in range(D) if d != dim]
        assert torch.allclose(inputs[row][:, others], mean[others].expand(3, -1), atol=1e-9)
        assert torch.allclose(inputs[row][:, dim], mean[dim] + values * spread[dim], atol=1e-9)


def test_the_latent_command_draws_three_pictures(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    small = ["--epochs", "1", "--latent-dim", "3", "--hidden-dims", "16", "--quiet"]
    assert main(["train", *small, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["latent", str(run), "--num-points", "50", "--out", str(tmp_path / "pics")]) == 0
    written = capsys.readouterr().out.split()
    for name in ("latent.png", "interpolation.png", "traversal.png"):
        path = tmp_path / "pics" / name
        assert str(path) in written and path.read_bytes()[:4] == b"\x89PNG"
    assert main(["latent", str(tmp_path / "none")]) == 2


@pytest.mark.parametrize("sizes", [(3,), (3, 2)])
def test_encode_is_what_reconstruct_decodes(sizes: tuple[int, ...]) -> None:
    config = VAEConfig(6, hidden_dims=(8,), guide="diagonal", latent_dims=sizes)
    vae, x = VAE(config), torch.rand(5, 6).round()
    assert torch.equal(vae.reconstruct(x), vae.decode(vae.encode(x)))
    assert vae.encode(x).shape == (5, sizes[0])


def test_image_grids_leave_the_cells_after_the_last_image_empty() -> None:
    from pyro_vae.pictures import tile

    images = torch.ones(5, 4)  # five white 2x2 images in rows of three
    grid = tile(torch.cat([images, torch.full((1, 4), float("nan"))]).reshape(2, 3, 4), (2, 2))
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1)
    white = grid == 1.0
    assert int(white.sum()) == 5 * 4  # the five images, and no sixth
    assert (grid[4:6, 7:9] == 0.5).all()  # the empty cell is background


def test_drawn_samples_come_from_the_means_z() -> None:
    sharp = VAE(VAEConfig(6, 2, (8,), "diagonal", likelihood="gaussian",
                          likelihood_options={"scale": 1e-6}))  # fmt: skip
    means = sharp.sample_images(5, torch.Generator().manual_seed(3))
    draws = sharp.sample_images(5, torch.Generator().manual_seed(3), draw_pixels=True)
    assert torch.allclose(draws, means, atol=1e-4) and not torch.equal(draws, means)
    binary = VAE(VAEConfig(6, 2, (8,), "diagonal"))
    draws = binary.sample_images(50, torch.Generator().manual_seed(3), draw_pixels=True)
    assert set(draws.unique().tolist()) == {0.0, 1.0}


def test_labelled_grids_and_the_sample_command(tmp_path: Path) -> None:
    from pyro_vae.pictures import save_image_grid

    images = torch.rand(2, 3, 4)
    path = save_image_grid(tmp_path / "g.png", images, (2, 2), title="t", row_labels=["a", "b"])
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="row_labels must name the 2 rows"):
        save_image_grid(tmp_path / "h.png", images, (2, 2), row_labels=["a"])
    run = tmp_path / "run"
    small = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "8", "--quiet"]
    assert main(["train", *small, "--out", str(run)]) == 0
    assert main(["sample", str(run), "-n", "6", "--draws", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists() and (tmp_path / "s-draws.png").exists()
