"""Guides: registry and the full-covariance factor against independent computations.

The registry-wide contract is in test_guide_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vae.guides import (
    GUIDES,
    AmortizedGuide,
    FullCovarianceGuide,
    make_guide,
    register_guide,
)


def test_registry_holds_the_gaussian_families() -> None:
    assert {"diagonal", "full"} <= set(GUIDES)
    assert all(issubclass(cls, AmortizedGuide) for cls in GUIDES.values())


def test_register_guide_rejects_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_guide("diagonal")(type("Other", (AmortizedGuide,), {}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key="nope"), "unknown guide 'nope'"),
        (dict(latent_dim=0), "latent_dim must be a positive integer"),
        (dict(hidden_dims=(8, -1)), "hidden_dims"),
        (dict(key="full", parameterization="cholesky"), "parameterization"),
        (dict(key="full", tril_scale=0.0), "tril_scale"),
        (dict(key="diagonal", num_flows=3), "bad options"),
    ],
)
def test_make_guide_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = dict(key="diagonal", data_dim=6, latent_dim=3, hidden_dims=(8,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_guide(**args)


def _random_full_guide(parameterization: str, latent_dim: int = 4) -> FullCovarianceGuide:
    q = FullCovarianceGuide(7, latent_dim, (10,), parameterization=parameterization)
    torch.nn.init.normal_(q.tril.weight)  # leave the diagonal start for a generic factor
    torch.nn.init.normal_(q.tril.bias)
    return q


@pytest.mark.parametrize("parameterization", ["scaled", "plain"])
def test_full_guide_factor_is_lower_triangular_with_sigma_on_the_diagonal(
    parameterization: str, float64: None
) -> None:
    q = _random_full_guide(parameterization)
    x = torch.bernoulli(torch.full((5, 7), 0.5))
    _, scale, _ = q.loc_scale(x)
    _, factor = q.scale_tril(x)
    assert torch.equal(factor, factor.tril())
    assert torch.allclose(torch.diagonal(factor, dim1=-2, dim2=-1), scale)
    assert (factor.triu(1) == 0).all() and (factor.tril(-1) != 0).any()


@pytest.mark.parametrize("parameterization", ["scaled", "plain"])
def test_full_guide_log_prob_matches_torch_multivariate_normal(
    parameterization: str, float64: None
) -> None:
    q = _random_full_guide(parameterization)
    x = torch.bernoulli(torch.full((5, 7), 0.5))
    loc, factor = q.scale_tril(x)
    reference = torch.distributions.MultivariateNormal(loc, scale_tril=factor)
    z = q(x).rsample((3,))
    assert torch.allclose(q(x).log_prob(z), reference.log_prob(z), atol=1e-10)


@pytest.mark.parametrize("parameterization", ["scaled", "plain"])
def test_full_guide_log_q_is_algorithm_2_formula(parameterization: str, float64: None) -> None:
    """z = mu + L eps and log q = -sum_i ((eps_i^2 + log 2 pi) / 2 + log sigma_i)."""
    q = _random_full_guide(parameterization)
    x = torch.bernoulli(torch.full((5, 7), 0.5))
    loc, scale, _ = q.loc_scale(x)
    _, factor = q.scale_tril(x)
    eps = torch.randn(5, 4)
    z = loc + (factor @ eps.unsqueeze(-1)).squeeze(-1)
    by_hand = -(((eps**2 + math.log(2 * math.pi)) / 2) + scale.log()).sum(-1)
    assert torch.allclose(q(x).log_prob(z), by_hand, atol=1e-10)


def test_full_guide_scaled_factor_is_diag_sigma_times_unit_lower() -> None:
    """L = diag(sigma) (I + c L'): dividing row i by sigma_i leaves ones on the diagonal."""
    q = _random_full_guide("scaled")
    x = torch.bernoulli(torch.full((2, 7), 0.5))
    _, scale, h = q.loc_scale(x)
    _, factor = q.scale_tril(x)
    unit = factor / scale.unsqueeze(-1)
    strict = torch.zeros(2, 4, 4)
    strict[:, q.rows, q.cols] = q.tril(h)
    assert torch.allclose(unit, torch.eye(4) + q.tril_scale * strict, atol=1e-6)
    assert q.tril_scale == pytest.approx(1.5 / 4)
