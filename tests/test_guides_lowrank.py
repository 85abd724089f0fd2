"""The low-rank-plus-diagonal guide: density against a dense MultivariateNormal, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

from pyro_vae.guides import GUIDES, MIN_SCALE, LowRankNormalGuide, make_guide


def test_registered() -> None:
    assert GUIDES["lowrank"] is LowRankNormalGuide


def test_density_matches_dense_covariance_built_independently(float64: None) -> None:
    q = make_guide("lowrank", data_dim=6, latent_dim=4, hidden_dims=(8,), rank=2, factor_scale=0.5)
    with torch.no_grad():
        q.factor.weight.normal_()
        q.factor.bias.normal_()
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    post = q(x)
    assert post.batch_shape == (3,) and post.event_shape == (4,)
    h = q.trunk(x)
    sigma = F.softplus(q.raw_scale(h)) + MIN_SCALE
    w = q.factor(h).reshape(3, 4, 2)
    factor = 0.5 * sigma[:, :, None] * w
    cov = torch.diag_embed(sigma**2) + factor @ factor.transpose(-1, -2)
    dense = MultivariateNormal(q.loc(h), covariance_matrix=cov)
    z = post.rsample((5,))
    assert torch.allclose(post.log_prob(z), dense.log_prob(z), rtol=0, atol=1e-9)
    log_q = post.log_prob(z).sum()
    log_q.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in q.parameters())


def test_starts_diagonal() -> None:
    q = make_guide("lowrank", data_dim=6, latent_dim=3, hidden_dims=(8,))
    post = q(torch.ones(2, 6))
    assert torch.equal(post.cov_factor, torch.zeros(2, 3, 8))


@pytest.mark.parametrize("options", [{"rank": 0}, {"rank": 1.5}, {"factor_scale": 0.0}])
def test_bad_options_quote_the_value(options: dict) -> None:
    value = next(iter(options.values()))
    with pytest.raises(ValueError, match=repr(value).replace(".", r"\.")):
        make_guide("lowrank", 6, 3, (8,), **options)
