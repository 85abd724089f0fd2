"""Likelihoods: the registry contract, closed-form log probabilities, IS log p(x) vs quadrature."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vae import VAE, VAEConfig
from pyro_vae.evaluate import log_weights
from pyro_vae.likelihoods import LIKELIHOODS, make_likelihood, register_likelihood

P = 5


def _options(key: str) -> dict:
    """Options a likelihood needs, filled from data the way the CLI does."""
    counts = torch.tensor([[0.0, 3.0, 7.0, 1.0, 2.0]])
    return LIKELIHOODS[key].options_for_data({}, counts, None)


def _likelihood(key: str, **options: object):  # noqa: ANN202
    return make_likelihood(key, P, **{**_options(key), **options}).double()


SUPPORT = {  # what each pixel kind's values must satisfy
    "binary": lambda x: bool(((x == 0) | (x == 1)).all()),
    "unit-interval": lambda x: bool(((x >= 0) & (x <= 1)).all()),
    "count": lambda x: bool(((x >= 0) & (x == x.round())).all()),
    "real": lambda x: bool(x.isfinite().all()),
}


@pytest.mark.parametrize("key", sorted(LIKELIHOODS))
def test_likelihood_contract(key: str) -> None:
    lik = _likelihood(key)
    out = torch.randn(4, 3, lik.outputs_per_pixel * P, dtype=torch.float64, requires_grad=True)
    p = lik(out)
    assert p.batch_shape == (4, 3, P) and p.event_shape == ()
    x = p.sample()
    assert x.shape == (4, 3, P) and SUPPORT[lik.pixels](x)
    lik.check_data(x.reshape(-1, P))  # its own draws lie in its support
    log_p = p.log_prob(x)
    assert log_p.shape == (4, 3, P) and log_p.isfinite().all()
    log_p.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert lik.mean(out).shape == (4, 3, P)
    assert torch.allclose(lik.mean(out), p.mean)
    assert isinstance(lik.discrete, bool) and lik.key == key
    span, mean = lik.value_range(), lik.mean(out).detach()
    if span is not None:
        assert span[0] <= float(mean.min()) and float(mean.max()) <= span[1]


def test_registry_refuses_duplicates_and_unknown_keys() -> None:
    assert {"bernoulli", "continuous-bernoulli", "binomial", "gaussian"} <= set(LIKELIHOODS)
    with pytest.raises(ValueError, match="already registered"):
        register_likelihood("gaussian")(type(LIKELIHOODS["gaussian"]))
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        make_likelihood("poisson", P)
    with pytest.raises(ValueError, match="bad options"):
        make_likelihood("bernoulli", P, total_count=3)
    with pytest.raises(ValueError, match="needs total_count"):
        make_likelihood("binomial", P)
    with pytest.raises(ValueError, match="scale must be"):
        make_likelihood("gaussian", P, scale="wide")


def test_bernoulli_log_prob_is_the_closed_form() -> None:
    out = torch.randn(3, P, dtype=torch.float64)
    x = torch.bernoulli(torch.full((3, P), 0.5, dtype=torch.float64))
    p = torch.sigmoid(out)
    expected = x * p.log() + (1 - x) * (1 - p).log()
    assert torch.allclose(_likelihood("bernoulli")(out).log_prob(x), expected, atol=1e-12)


def test_continuous_bernoulli_log_prob_is_the_closed_form() -> None:
    out = torch.randn(3, P, dtype=torch.float64) * 2 + 0.3
    x = torch.rand(3, P, dtype=torch.float64)
    lam = torch.sigmoid(out)
    log_norm = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))  # C(lambda)
    expected = log_norm + x * lam.log() + (1 - x) * (1 - lam).log()
    got = _likelihood("continuous-bernoulli")(out).log_prob(x)
    assert torch.allclose(got, expected, atol=1e-9)
    # a density on [0, 1]: it integrates to one (midpoint rule)
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    density = _likelihood("continuous-bernoulli")(out[:1, :1]).log_prob(grid[:, None]).exp()
    assert abs(float(density.mean()) - 1) < 1e-6


def test_binomial_log_prob_is_the_closed_form_and_takes_its_count_from_the_data() -> None:
    assert _options("binomial") == {"total_count": 7}  # the largest count seen
    assert LIKELIHOODS["binomial"].options_for_data({}, torch.zeros(2, P), 16) == {
        "total_count": 16
    }  # the data's declared levels win
    lik = _likelihood("binomial", total_count=7)
    out = torch.randn(3, P, dtype=torch.float64)
    x = torch.randint(0, 8, (3, P)).double()
    p = torch.sigmoid(out)
    log_choose = math.lgamma(8) - torch.lgamma(x + 1) - torch.lgamma(8 - x)
    expected = log_choose + x * p.log() + (7 - x) * (1 - p).log()
    assert torch.allclose(lik(out).log_prob(x), expected, atol=1e-10)
    assert lik.value_range() == (0.0, 7.0)
    with pytest.raises(ValueError, match="needs values in"):
        lik.check_data(torch.full((1, P), 8.0))


@pytest.mark.parametrize("scale", ["learned", "decoded", 0.3])
def test_gaussian_log_prob_is_the_closed_form(scale: str | float) -> None:
    lik = _likelihood("gaussian", scale=scale, init_scale=0.7)
    out = torch.randn(3, lik.outputs_per_pixel * P, dtype=torch.float64)
    x = torch.randn(3, P, dtype=torch.float64)
    loc = out[:, :P]
    if scale == "decoded":
        sigma = torch.nn.functional.softplus(out[:, P:]) + 1e-2
    elif scale == "learned":
        sigma = torch.full((P,), 0.7, dtype=torch.float64)  # its starting value
    else:
        sigma = torch.full((P,), 0.3, dtype=torch.float64)
    expected = -((x - loc) ** 2) / (2 * sigma**2) - sigma.log() - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(lik(out).log_prob(x), expected, atol=1e-10)
    assert lik.outputs_per_pixel == (2 if scale == "decoded" else 1)
    assert len(list(lik.parameters())) == (1 if scale == "learned" else 0)


class _FixedProposal(torch.nn.Module):
    """q(z|x) = N(m_b, s_b^2) for the rows b of the one batch it is built for."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.loc, self.scale = loc, scale

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


@pytest.mark.parametrize("key", sorted(LIKELIHOODS))
def test_is_log_likelihood_matches_quadrature_on_a_one_dimensional_latent(key: str) -> None:
    """log p(x) = log int N(z; 0, 1) prod_p p(x_p | z) dz on a fine grid, against IS.

    The proposal is a Gaussian with the exact posterior's mean and 1.5 times its spread (from
    the same grid), so the importance weights are well behaved for every likelihood.
    """
    torch.manual_seed(0)
    config = VAEConfig(P, 1, (8,), "diagonal", likelihood=key, likelihood_options=_options(key))
    vae = VAE(config).double()
    with torch.no_grad():
        _, x = vae.model(batch_size=3)  # images the model itself draws
        z = torch.linspace(-9, 9, 20001, dtype=torch.float64)[:, None, None]  # (G, 1, 1)
        log_joint = vae.likelihood_of(z).log_prob(x).sum(-1) - z[..., 0] ** 2 / 2  # (G, B)
        log_joint = log_joint - 0.5 * math.log(2 * math.pi)
        exact = torch.logsumexp(log_joint, 0) + math.log(float(z[1, 0, 0] - z[0, 0, 0]))
        post = torch.softmax(log_joint, 0)  # (G, B) posterior weights on the grid
        mean = (post * z[..., 0]).sum(0)
        std = ((post * (z[..., 0] - mean) ** 2).sum(0)).sqrt()
        proposal = _FixedProposal(mean[:, None], 1.5 * std[:, None])
        vae = VAE(config, encoder=proposal, decoder=vae.decoder).double()
        w = log_weights(vae, x, 20000)
        log_w = w["log_lik"] + w["log_prior"] - w["log_q"]  # (K, B)
    estimate = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    ratio = (log_w - log_w.max(0).values).exp()
    std_error = ratio.std(0) / ratio.mean(0) / math.sqrt(log_w.shape[0])  # delta method
    assert (estimate - exact).abs().max() < 5 * std_error.max() + 1e-6
    assert std_error.max() < 0.01  # the check has teeth
    assert (exact - (w["log_lik"] + w["log_prior"] - w["log_q"]).mean(0) >= 0).all()  # ELBO
