"""Priors (standard, mixture, vamp) and the hyperspherical latent (vMF, uniform on S^{D-1})."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

from pyro_vae import GUIDES, VAE, VAEConfig, log_likelihood, make_guide
from pyro_vae.cli import main
from pyro_vae.priors import PRIORS, fixed_priors, make_prior, register_prior
from pyro_vae.sphere import (
    HypersphericalUniform,
    VonMisesFisher,
    log_bessel_iv,
    mean_resultant_length,
)
from pyro_vae.train import make_optimizer


def one_d_prior(key: str) -> torch.nn.Module:
    encoder = make_guide("diagonal", data_dim=5, latent_dim=1, hidden_dims=(4,))
    prior = make_prior(key, 1, encoder, num_components=4)
    with torch.no_grad():  # move away from the initialization so the check is not symmetric
        for p in prior.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return prior


def trapezoid_mass(log_density: torch.Tensor, grid: torch.Tensor) -> float:
    return float(torch.trapezoid(log_density.detach().exp(), grid))


def test_registry_holds_the_priors_and_refuses_bad_keys() -> None:
    assert sorted(PRIORS) == ["mixture", "standard", "vamp"]
    with pytest.raises(ValueError, match="unknown prior 'flat'"):
        make_prior("flat", 2)
    with pytest.raises(ValueError, match="already registered"):
        register_prior("mixture")(type(PRIORS["mixture"]))
    with pytest.raises(ValueError, match="bad options"):
        make_prior("mixture", 2, num_parts=3)
    with pytest.raises(ValueError, match="vamp prior needs an encoder"):
        make_prior("vamp", 2)
    with pytest.raises(ValueError, match="prior 'mixture' and latent 'sphere' do not fit"):
        make_prior("mixture", 3, latent="sphere")


@pytest.mark.usefixtures("float64")
def test_standard_prior_is_the_unit_gaussian() -> None:
    z = torch.randn(7, 3)
    expected = -0.5 * (z**2).sum(-1) - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(make_prior("standard", 3)().log_prob(z), expected)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("key", ["mixture", "vamp"])
def test_prior_density_integrates_to_one_and_gradients_reach_parameters(key: str) -> None:
    prior = one_d_prior(key)
    grid = torch.linspace(-40, 40, 40001).unsqueeze(-1)
    log_p = prior().log_prob(grid)
    assert log_p.shape == (40001,)
    assert trapezoid_mass(log_p, grid.squeeze(-1)) == pytest.approx(1.0, abs=1e-6)
    prior().log_prob(torch.randn(9, 1)).sum().backward()
    owned = list(prior.parameters())
    if key == "vamp":
        owned += list(prior._encoder[0].parameters())  # shared with the guide
    assert owned and all(p.grad is not None and p.grad.abs().sum() > 0 for p in owned)


@pytest.mark.usefixtures("float64")
def test_vamp_prior_is_the_mean_of_the_encoder_gaussians_at_the_pseudo_inputs() -> None:
    prior = one_d_prior("vamp")
    encoder = prior._encoder[0]
    loc, scale, _ = encoder.loc_scale(torch.sigmoid(prior.pseudo_logits))  # (K, 1)
    z = torch.randn(6, 1)
    by_hand = torch.logsumexp(dist.Normal(loc, scale).log_prob(z.unsqueeze(-2)).sum(-1), -1)
    assert torch.allclose(prior().log_prob(z), by_hand - math.log(4))


@pytest.mark.usefixtures("float64")
def test_vamp_prior_shares_one_mixture_only_inside_a_fixed_block() -> None:
    """Inside ``fixed_priors`` gradient-free calls share one mixture (one encoder pass), equal
    to the one built afresh; nested blocks keep it; outside, and with gradients, every call
    builds its own, so a fused optimizer step (which leaves the version counters alone) is
    seen at once."""
    prior = one_d_prior("vamp")
    encoder = prior._encoder[0]
    calls = []
    encoder.trunk.register_forward_hook(lambda *_: calls.append(1))
    z = torch.randn(6, 1)

    def fresh() -> torch.Tensor:
        with torch.enable_grad():
            return prior().log_prob(z).detach()

    with torch.no_grad():
        with fixed_priors(prior):
            first = prior()
            with fixed_priors(prior):
                assert prior() is first
            assert prior() is first and len(calls) == 1
            assert torch.equal(first.log_prob(z), fresh())
            with torch.enable_grad():
                assert prior() is not prior()
        assert prior() is not first and prior() is not prior()
    params = [*prior.parameters(), *encoder.parameters()]
    optimizer = make_optimizer(params, lr=0.1, device=torch.device("cpu"))
    for p in params:
        p.grad = torch.randn_like(p)
    with torch.no_grad():
        before = prior().log_prob(z)
        optimizer.step()
        after = prior().log_prob(z)
    assert not torch.equal(before, after) and torch.equal(after, fresh())


def pairs() -> list[tuple[str, str]]:
    return [(g, p) for g in sorted(GUIDES) if g != "vmf" for p in sorted(PRIORS)]


@pytest.mark.parametrize(("guide", "prior"), pairs())
def test_any_guide_trains_with_any_prior(guide: str, prior: str) -> None:
    options = {} if prior == "standard" else {"num_components": 3}
    vae = VAE(VAEConfig(6, 2, (8,), guide, prior=prior, prior_options=options))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    value = loss.differentiable_loss(vae.model, vae.guide, x)
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None for p in vae.latent_prior.parameters())
    assert log_likelihood(vae, x, num_samples=20).isfinite().all()


@pytest.mark.usefixtures("float64")
def test_importance_sampled_log_likelihood_with_a_vamp_prior_matches_a_grid() -> None:
    vae = VAE(VAEConfig(3, 1, (4,), "diagonal", prior="vamp", prior_options={"num_components": 3}))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    grid = torch.linspace(-30, 30, 30001)
    with torch.no_grad():
        log_joint = vae.prior().log_prob(grid.unsqueeze(-1)).unsqueeze(-1) + dist.Bernoulli(
            logits=vae.decoder(grid.unsqueeze(-1)).unsqueeze(-2)
        ).log_prob(x).sum(-1)  # (G, B)
    exact = torch.logsumexp(log_joint, 0) + math.log(float(grid[1] - grid[0]))
    estimate = log_likelihood(vae, x, num_samples=20000)
    assert torch.allclose(estimate, exact, atol=0.02)


# ---------------------------------------------------------------- sphere


def sphere_grid(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on S^2 ``(n, 2n, 3)`` and their quadrature weights sin(theta) dtheta dphi."""
    theta = (torch.arange(n) + 0.5) * math.pi / n
    phi = (torch.arange(2 * n) + 0.5) * math.pi / n
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    z = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1)
    return z, t.sin() * (math.pi / n) ** 2


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kappa", [0.3, 4.0, 40.0])
def test_von_mises_fisher_density_integrates_to_one_on_the_sphere(kappa: float) -> None:
    z, weight = sphere_grid()
    q = VonMisesFisher(F.normalize(torch.tensor([0.3, -0.5, 0.8]), dim=0), torch.tensor(kappa))
    assert float((q.log_prob(z).exp() * weight).sum()) == pytest.approx(1.0, abs=1e-4)
    uniform = HypersphericalUniform(3)
    assert float((uniform.log_prob(z).exp() * weight).sum()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.usefixtures("float64")
def test_log_bessel_matches_the_half_integer_closed_form() -> None:
    kappa = torch.tensor([0.1, 1.0, 7.0, 300.0], requires_grad=True)
    closed = 0.5 * torch.log(2 / (math.pi * kappa)) + kappa + torch.log1p(-torch.exp(-2 * kappa))
    closed -= math.log(2)  # log sinh(k) = k + log(1 - e^{-2k}) - log 2
    (ours,) = torch.autograd.grad(log_bessel_iv(0.5, kappa).sum(), kappa)
    (exact,) = torch.autograd.grad(closed.sum(), kappa)
    assert torch.allclose(log_bessel_iv(0.5, kappa), closed)
    assert torch.allclose(ours, exact)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(("dim", "kappa"), [(2, 2.0), (3, 0.5), (3, 10.0), (5, 3.0), (16, 20.0)])
def test_von_mises_fisher_samples_have_the_closed_form_mean(dim: int, kappa: float) -> None:
    mu = F.normalize(torch.randn(dim), dim=0)
    q = VonMisesFisher(mu, torch.tensor(kappa), validate_args=True)
    z = q.rsample((20000,))
    assert z.shape == (20000, dim) and torch.allclose(z.norm(dim=-1), torch.ones(20000))
    mean = z.mean(0)
    expected = float(mean_resultant_length(dim, torch.tensor(kappa)))
    assert float(mean.norm()) == pytest.approx(expected, abs=0.01)
    assert torch.allclose(mean / mean.norm(), mu, atol=0.05)
    assert torch.allclose(q.mean, expected * mu)


@pytest.mark.usefixtures("float64")
def test_von_mises_fisher_gradient_on_s2_matches_the_closed_form() -> None:
    mu = F.normalize(torch.tensor([1.0, 2.0, -2.0]), dim=0)
    kappa = torch.tensor(2.0, requires_grad=True)
    z = VonMisesFisher(mu, kappa).rsample((200000,))
    (ours,) = torch.autograd.grad((z @ mu).mean(), kappa)
    exact_kappa = torch.tensor(2.0, requires_grad=True)
    (exact,) = torch.autograd.grad(mean_resultant_length(3, exact_kappa), exact_kappa)
    assert float(ours) == pytest.approx(float(exact), rel=0.03)


def test_vmf_guide_contract_and_training_on_the_sphere() -> None:
    q = make_guide("vmf", data_dim=6, latent_dim=3, hidden_dims=(8,))
    post = q(torch.bernoulli(torch.full((4, 6), 0.5)))
    assert post.batch_shape == (4,) and post.event_shape == (3,)
    z = post.rsample((5,))
    assert z.shape == (5, 4, 3) and torch.allclose(z.norm(dim=-1), torch.ones(5, 4), atol=1e-5)
    post.log_prob(z).mean().backward()
    assert all(p.grad is not None for p in q.parameters())
    vae = VAE(VAEConfig(6, 3, (8,), "vmf", latent="sphere"))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    trace = pyro.poutine.trace(vae.model).get_trace(batch_size=5)
    assert isinstance(trace.nodes["vae.z"]["fn"], HypersphericalUniform)
    assert torch.isfinite(Trace_ELBO().differentiable_loss(vae.model, vae.guide, x))
    assert log_likelihood(vae, x, num_samples=10).isfinite().all()
    assert vae.sample_images(3).shape == (3, 6) and vae.reconstruct(x).shape == (5, 6)


@pytest.mark.slow  # trains and evaluates on digits through the CLI
def test_cli_takes_prior_and_latent_flags(tmp_path: pytest.TempPathFactory, capsys) -> None:  # noqa: ANN001
    common = ["train", "--epochs", "1", "--latent-dim", "3", "--hidden-dims", "16", "--quiet"]
    out = tmp_path / "run"
    args = [*common, "--prior", "mixture", "--prior-option", "num_components=3", "--out", str(out)]
    assert main(args) == 0
    assert main(["evaluate", str(out), "--num-samples", "5", "--quiet", "--json"]) == 0
    bad = [*common, "--guide", "vmf", "--latent", "euclidean", "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "guide 'vmf' and latent 'euclidean' do not fit" in capsys.readouterr().err
