"""Estimators against quadrature, closed forms and the bound ordering."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_vae import VAE, VAEConfig, elbo, evaluate, log_likelihood
from pyro_vae.evaluate import log_weights


def _one_dim_vae(guide: str) -> VAE:
    vae = VAE(VAEConfig(data_dim=4, latent_dim=1, hidden_dims=(6,), guide=guide))
    with torch.no_grad():  # a decoder whose pixels depend strongly on z
        for p in vae.decoder.parameters():
            p.mul_(3.0)
    return vae


def _quadrature_log_px(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log int N(z; 0, 1) prod_p Bernoulli(x_p | z) dz on a fine grid, (B,)."""
    z = torch.linspace(-12, 12, 48001).unsqueeze(-1)  # (G, 1)
    logits = vae.decoder(z)  # (G, P)
    log_lik = (x.unsqueeze(1) * logits - F.softplus(logits)).sum(-1)  # (B, G)
    log_prior = -0.5 * (z.squeeze(-1) ** 2 + math.log(2 * math.pi))
    dz = (z[1] - z[0]).item()
    return torch.logsumexp(log_lik + log_prior, dim=-1) + math.log(dz)


@pytest.mark.parametrize("guide", ["diagonal", "full"])
def test_importance_sampled_log_px_matches_quadrature(guide: str, float64: None) -> None:
    vae = _one_dim_vae(guide)
    with torch.no_grad():  # a proposal wider than the posterior keeps the weights bounded
        vae.encoder.raw_scale.weight.zero_()
        vae.encoder.raw_scale.bias.fill_(1.3)
    x = torch.tensor([[0.0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    with torch.no_grad():
        exact = _quadrature_log_px(vae, x)
        # a small element budget forces many particle chunks
        estimate = log_likelihood(vae, x, num_samples=20000, max_elements=5000)
        single = elbo(vae, x, num_samples=20000)
    assert torch.allclose(estimate, exact, atol=0.02), (estimate, exact)
    assert (single < exact - 0.01).all(), "an untrained q should leave a visible gap"


def test_k_sample_bound_is_at_least_the_elbo_on_average(float64: None) -> None:
    vae = _one_dim_vae("diagonal")
    x = torch.bernoulli(torch.full((50, 4), 0.5))
    with torch.no_grad():
        w = log_weights(vae, x, 4000)
    log_w = (w["log_lik"] + w["log_prior"] - w["log_q"]).reshape(400, 10, 50)
    bound_10 = torch.logsumexp(log_w, dim=1) - math.log(10)  # 400 independent 10-sample bounds
    bound_1 = log_w[:, 0]
    diff = bound_10 - bound_1  # (400, 50)
    per_point, per_point_se = diff.mean(0), diff.std(0) / math.sqrt(400)
    assert (per_point > -3 * per_point_se).all()  # no datapoint where the bound is lower
    assert diff.mean() > 3 * diff.std() / math.sqrt(diff.numel())  # and higher overall


def test_evaluation_parts_add_up_and_kl_matches_closed_form(float64: None) -> None:
    vae = VAE(VAEConfig(data_dim=5, latent_dim=2, hidden_dims=(7,), guide="diagonal"))
    x = torch.bernoulli(torch.full((6, 5), 0.5))
    result = evaluate(vae, x, num_samples=40000, batch_size=4)
    assert result.elbo == pytest.approx(result.reconstruction - result.kl)
    assert result.log_likelihood >= result.elbo and result.gap == pytest.approx(
        result.log_likelihood - result.elbo
    )
    with torch.no_grad():
        q = vae.encoder(x)
        exact_kl = torch.distributions.kl_divergence(q, vae.prior()).mean().item()
    assert result.kl == pytest.approx(exact_kl, abs=0.02)
    assert result.num_points == 6 and result.num_samples == 40000


def test_evaluate_rejects_bad_arguments() -> None:
    vae = VAE(VAEConfig(data_dim=5, latent_dim=2, hidden_dims=(7,)))
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(vae, torch.zeros(2, 5), num_samples=0)
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        log_likelihood(vae, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="empty"):
        evaluate(vae, torch.zeros(0, 5))
