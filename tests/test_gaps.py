"""Inference-gap split: local posteriors reach the family's optimum; gaps are non-negative."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.gaps import inference_gaps, local_offsets
from pyro_vae.guides import GUIDES
from pyro_vae.model import VAE, VAEConfig


def _vae(key: str = "diagonal", latent_dim: int = 1, data_dim: int = 6) -> VAE:
    return VAE(VAEConfig(data_dim, latent_dim, (8,), key))


def _grid_log_joint(vae: VAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x_b, z_g) for a 1-D grid z ``(G,)``: ``(G, B)``."""
    logits = vae.decoder(z.unsqueeze(-1)).unsqueeze(1)
    log_lik = dist.Bernoulli(logits=logits).log_prob(x).sum(-1)
    return log_lik + dist.Normal(0.0, 1.0).log_prob(z).unsqueeze(-1)


def _gaussian_elbo(
    log_joint: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    log_q = dist.Normal(loc, log_scale.exp()).log_prob(z.unsqueeze(-1))  # (G, B)
    return torch.trapezoid(log_q.exp() * (log_joint - log_q), z, dim=0)


def _best_gaussian_elbo(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature log p(x) and the ELBO of the best Gaussian q per datapoint, each ``(B,)``."""
    z = torch.linspace(-10, 10, 2001)
    with torch.no_grad():
        log_joint = _grid_log_joint(vae, x, z)
    log_px = torch.logsumexp(log_joint, 0) + math.log(float(z[1] - z[0]))
    loc = torch.zeros(x.shape[0], requires_grad=True)
    log_scale = torch.zeros(x.shape[0], requires_grad=True)
    optimizer = torch.optim.LBFGS([loc, log_scale], max_iter=60, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -_gaussian_elbo(log_joint, z, loc, log_scale).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return log_px, _gaussian_elbo(log_joint, z, loc, log_scale)


def test_local_posteriors_reach_the_best_gaussian_and_split_the_gap(float64: None) -> None:
    vae = _vae()
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    split, points = inference_gaps(
        vae, x, num_steps=150, lr=0.1, num_particles=20, num_samples=4000
    )
    log_px, best = _best_gaussian_elbo(vae, x)
    torch.testing.assert_close(points["log_likelihood"], log_px, atol=0.02, rtol=0)
    torch.testing.assert_close(points["elbo_local"], best, atol=0.05, rtol=0)
    assert (points["elbo_amortized"] < points["elbo_local"] - 0.01).any()  # random encoder
    assert (points["log_likelihood"] - points["elbo_local"] > -0.02).all()
    assert (points["elbo_local"] - points["elbo_amortized"] > -0.02).all()
    assert math.isclose(split.inference_gap, split.approximation_gap + split.amortization_gap)
    assert math.isclose(split.log_likelihood, float(points["log_likelihood"].mean()))


@pytest.mark.parametrize("key", sorted(GUIDES))
def test_gaps_are_non_negative_for_every_guide(key: str) -> None:
    vae = _vae(key, latent_dim=2)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    split, _ = inference_gaps(vae, x, num_steps=60, lr=0.05, num_samples=2000)
    assert split.approximation_gap > -0.05 and split.amortization_gap > -0.05
    assert split.amortization_gap > 0.01  # an untrained encoder is far from each optimum
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, before[k])  # the trained model is untouched
    assert all(p.requires_grad for p in vae.parameters())


def test_local_offsets_start_at_q_phi_act_per_datapoint_and_are_removed() -> None:
    vae = _vae(latent_dim=2)
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    reference = vae.encoder(x).mean
    with local_offsets(vae.encoder, 3) as offsets:
        torch.testing.assert_close(vae.encoder(x).mean, reference)
        with torch.no_grad():
            offsets[-1][1].fill_(0.7)  # some head's bias, row 1 only
            offsets[1][1].fill_(0.7)
        shifted = vae.encoder(x).mean
        assert not torch.allclose(shifted[1], reference[1])
        torch.testing.assert_close(shifted[[0, 2]], reference[[0, 2]])
    torch.testing.assert_close(vae.encoder(x).mean, reference)


def test_cli_gaps_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(torch.full((82, 4), 0.5), generator=g).numpy()
    np.savez(tmp_path / "tiny.npz", train=data[:40], valid=data[40:72], test=data[72:])
    run = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "tiny.npz"), "--guide", "diagonal",
            "--latent-dim", "2", "--hidden-dims", "8", "--epochs", "1", "--batch-size", "20",
            "--out", str(run), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    gaps = ["gaps", str(run), "--num-points", "6", "--num-steps", "5", "--num-samples", "50"]
    assert main([*gaps, "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_points"] == 6 and result["split"] == "test"
    assert math.isclose(
        result["inference_gap"], result["approximation_gap"] + result["amortization_gap"]
    )
    assert json.loads((run / "gaps.json").read_text()) == result
    assert main(["gaps", str(tmp_path)]) == 2
