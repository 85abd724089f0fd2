"""STL and DReG encoder-gradient estimators: unbiasedness, exact cases, decoder, API, CLI."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from robust_helpers import assert_jit_equals_eager
from script_loader import load_script
from torch import Tensor, nn

from pyro_vae.cli import main
from pyro_vae.distributions import NoiseScoredNormal, TriangularFactorNormal
from pyro_vae.model import VAE, VAEConfig
from pyro_vae.objectives import (
    IWAE_ELBO,
    STL_ELBO,
    DReG_IWAE_ELBO,
    JitSTL_ELBO,
    STL_MeanField_ELBO,
    encoder_gradient_moments,
    make_objective,
    score_function,
)
from pyro_vae.train import TrainConfig, make_loss


def _x(n: int = 4, data_dim: int = 5) -> Tensor:
    return torch.bernoulli(torch.full((n, data_dim), 0.5))


def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _recording(vae: VAE, traces: list) -> Callable:
    """vae.guide, keeping the trace of each call (the first is the one the loss differentiates)."""

    def guide(*args: object, **kwargs: object) -> Tensor:
        with poutine.trace() as tracer:
            out = vae.guide(*args, **kwargs)
        traces.append(tracer.trace)
        return out

    return guide


def _latents(trace: poutine.Trace) -> dict[str, Tensor]:
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name.startswith("vae.z")
    }


# ---------------------------------------------------------------- independent references


def _references(vae: VAE, x: Tensor, draws: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """-[log p(x, z) - log q(z|x)] on the given draws z (with their graph), twice.

    First with log q scored by a frozen deep copy of the VAE (STL as Roeder et al. define
    it: parameters stopped, a function of z only, by the general formulas since the copy
    never drew these values); then with the live guide (the pathwise gradient).
    """
    frozen = copy.deepcopy(vae).requires_grad_(False)
    scored = []
    for source in (frozen, vae):
        with source.without_param_statements():
            trace = poutine.trace(poutine.condition(source.guide, data=draws)).get_trace(x)
        scored.append(trace.log_prob_sum())
    with vae.without_param_statements():
        log_p = poutine.trace(poutine.condition(vae.model, data=draws)).get_trace(x)
    return -(log_p.log_prob_sum() - scored[0]), -(log_p.log_prob_sum() - scored[1])


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig(5, 2, (6,), "diagonal"),  # NoiseScoredNormal: scores its own draws from eps
        VAEConfig(5, 3, (6,), "full"),  # TriangularFactorNormal, likewise
        VAEConfig(5, 2, (6,), "lowrank"),
        VAEConfig(5, 2, (6,), "iaf"),  # scored at a given z by inverting the flow
        VAEConfig(5, 3, (6,), "diagonal", latent_dims=(3, 2)),  # q(z2 | z1, x)
    ],
    ids=["diagonal", "full", "lowrank", "iaf", "two-layer"],
)
def test_stl_gradient_equals_the_stop_gradient_surrogate_on_the_same_draws(
    float64: None, config: VAEConfig
) -> None:
    vae, x, traces = VAE(config), _x(), []
    params = list(vae.parameters())
    stl = STL_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, _recording(vae, traces), x)
    reference, pathwise = _references(vae, x, _latents(traces[0]))
    torch.testing.assert_close(stl, reference, rtol=1e-12, atol=0)
    ours = _grads(stl, params)
    for mine, expected in zip(ours, _grads(reference, params), strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-11)
    gaps = [(a - b).abs().max() for a, b in zip(ours, _grads(pathwise, params), strict=True)]
    assert max(gaps) > 1e-3  # the score term was there to remove


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig(5, 2, (6,), "diagonal"),
        VAEConfig(5, 2, (6,), "iaf"),
        VAEConfig(
            5, 3, (6,), "diagonal", latent_dims=(3, 2), inference="top-down", prior="vamp",
            prior_options={"num_components": 3},
        ),
    ],
    ids=["diagonal", "iaf", "top-down-vamp"],
)  # fmt: skip
def test_compiled_stl_is_the_eager_stl(float64: None, config: VAEConfig) -> None:
    # also under KL warm-up, whose weight enters the compiled graph as a tensor
    vae, x = VAE(config), _x(n=6)
    assert_jit_equals_eager(vae, x, betas=(1.0, 0.25), elbos=(STL_ELBO, JitSTL_ELBO))


def test_training_compiles_the_stl_loss_by_default() -> None:
    vae = VAE(VAEConfig(5, 2, (6,), "diagonal"))
    assert type(make_loss(TrainConfig(gradient_estimator="stl"), vae)) is JitSTL_ELBO
    assert type(make_loss(TrainConfig(gradient_estimator="stl", jit=False), vae)) is STL_ELBO
    meanfield = TrainConfig(objective="meanfield", gradient_estimator="stl")
    assert type(make_loss(meanfield, vae)) is STL_MeanField_ELBO


@pytest.mark.parametrize("guide", ["full", "iaf"])
def test_dreg_gradient_equals_its_weighted_stop_gradient_surrogate(
    float64: None, guide: str
) -> None:
    vae, x, traces, k = VAE(VAEConfig(5, 2, (6,), guide)), _x(), [], 4
    frozen = copy.deepcopy(vae.encoder).requires_grad_(False)
    enc, dec = list(vae.encoder.parameters()), list(vae.decoder.parameters())
    loss = DReG_IWAE_ELBO(num_particles=k).differentiable_loss(
        vae.model, _recording(vae, traces), x, num_data=12
    )
    z = traces[0].nodes["vae.z"]["value"]  # (K, B, D)
    log_p = vae.likelihood_of(z).log_prob(x).sum(-1) + vae.prior().log_prob(z)
    log_w = log_p - frozen(x).log_prob(z)  # (K, B), log q with stopped parameters
    w = torch.softmax(log_w.detach(), 0)
    encoder_surrogate = -3.0 * (w**2 * log_w).sum()  # N / B = 12 / 4
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(loss, -3.0 * bound.sum(), rtol=1e-12, atol=0)
    for mine, expected in zip(_grads(loss, enc), _grads(encoder_surrogate, enc), strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-11)
    decoder_iwae = _grads(-3.0 * bound.sum(), dec)  # IWAE's sum_k w~_k grad log p
    for mine, expected in zip(_grads(loss, dec), decoder_iwae, strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-11)


def _log_density(fn: Callable, draws: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """Sum of the log densities of fn's sample sites (K, B), with its latents set to draws."""
    with pyro.plate("num_particles_vectorized", k, dim=-2):
        trace = poutine.trace(poutine.condition(fn, data=draws)).get_trace(x)
    trace.compute_log_prob()
    return sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig(5, 3, (6,), "diagonal", latent_dims=(3, 2)),
        VAEConfig(5, 3, (6,), "diagonal", latent_dims=(3, 2), inference="top-down",
                  decoder_input="all"),
        VAEConfig(5, 2, (6,), "iaf", latent_dims=(2, 2)),
        VAEConfig(5, 2, (6,), "diagonal", prior="vamp", prior_options={"num_components": 3}),
    ],
    ids=["bottom-up", "top-down", "iaf-layers", "vamp-shares-the-encoder"],
)  # fmt: skip
def test_dreg_gradient_equals_the_two_pass_surrogate(float64: None, config: VAEConfig) -> None:
    """Every parameter's gradient equals that of the surrogate written with a second model
    pass at the detached draws: sum_k w~^2 [log w_k + score_k] + (w~ - w~^2) log p(x, sg z_k),
    whatever the layers (one weight per particle on each path through z, not one per layer)."""
    vae, x, traces, k = VAE(config), _x(), [], 4
    params = list(vae.parameters())
    loss = DReG_IWAE_ELBO(num_particles=k).differentiable_loss(
        vae.model, _recording(vae, traces), x
    )
    draws = _latents(traces[0])
    fixed = {name: value.detach() for name, value in draws.items()}
    with vae.without_param_statements():
        log_p = _log_density(vae.model, draws, x, k)
        log_q = _log_density(vae.guide, draws, x, k)
        log_p_fixed = _log_density(vae.model, fixed, x, k)
        score = _log_density(vae.guide, fixed, x, k)
    log_w = log_p - log_q
    w = torch.softmax(log_w.detach(), 0)
    path = log_w + (score - score.detach())
    surrogate = (w**2 * path + (w - w**2) * log_p_fixed).sum(0)
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(loss, -bound.sum(), rtol=1e-12, atol=0)
    for mine, expected in zip(_grads(loss, params), _grads(-surrogate.sum(), params), strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-11)


def test_dreg_weights_a_latent_outside_the_data_plate_per_particle(float64: None) -> None:
    """A global z makes log w_k one sum over the batch: DReG's encoder gradient is then
    sum_k w~_k^2 d/dz log w_k dz/dloc with one weight per particle, written out here."""
    loc, draws, k = torch.tensor([0.3, -0.2], requires_grad=True), [], 4

    def model(x: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x: Tensor) -> None:
        draws.append(pyro.sample("z", dist.Normal(loc, 1.0).to_event(1)))

    x = torch.tensor([0.5, -1.0, 2.0])
    loss = DReG_IWAE_ELBO(num_particles=k).differentiable_loss(model, guide, x)
    z = draws[0][:, 0]  # (K, 2), a function of loc
    log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_p = log_p + dist.Normal(z.sum(-1, keepdim=True), 1.0).log_prob(x).sum(-1)
    log_w = log_p - dist.Normal(loc.detach(), 1.0).log_prob(z).sum(-1)  # (K,), path only
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(loss, -bound, rtol=1e-12, atol=0)
    w = torch.softmax(log_w.detach(), 0)
    (expected,) = _grads(-(w**2 * log_w).sum(), [loc])
    torch.testing.assert_close(_grads(loss, [loc])[0], expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- DReG by hand


class _LinearNormalEncoder(nn.Module):
    """q(z|x) = N(a^T x + c, exp(log_scale)^2), 1-D z; a plain ``Normal``."""

    def __init__(self, data_dim: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(data_dim) * 0.5)
        self.c = nn.Parameter(torch.tensor(0.3))
        self.log_scale = nn.Parameter(torch.tensor(-0.4))

    def forward(self, x: Tensor) -> dist.Distribution:
        loc = (x * self.a).sum(-1, keepdim=True) + self.c
        return dist.Normal(loc, self.log_scale.exp().expand_as(loc)).to_event(1)


def test_dreg_encoder_gradient_matches_its_closed_form(float64: None) -> None:
    """1-D z, K = 3, Gaussian p(x|z) = N(w z + b, s^2): every derivative written out."""
    s, k = 0.7, 3
    encoder, decoder = _LinearNormalEncoder(2), nn.Linear(1, 2)
    config = VAEConfig(2, 1, (4,), "diagonal", likelihood="gaussian",
                       likelihood_options={"scale": s})  # fmt: skip
    vae = VAE(config, encoder=encoder, decoder=decoder)
    x, traces = torch.tensor([[0.4, -1.2], [1.5, 0.3]]), []
    loss = DReG_IWAE_ELBO(num_particles=k).differentiable_loss(
        vae.model, _recording(vae, traces), x
    )
    mine = _grads(loss, [encoder.a, encoder.c, encoder.log_scale])
    with torch.no_grad():
        z = traces[0].nodes["vae.z"]["value"][..., 0]  # (K, B)
        a, c, sigma = encoder.a, encoder.c, encoder.log_scale.exp()
        w, b = decoder.weight[:, 0], decoder.bias  # (P,), (P,)
        mu = x @ a + c  # (B,)
        eps = (z - mu) / sigma
        residual = x - w * z.unsqueeze(-1) - b  # (K, B, P)
        log_w = (
            -0.5 * z**2
            - 0.5 * (residual**2).sum(-1) / s**2
            - 2 * math.log(s)
            + 0.5 * eps**2
            + encoder.log_scale
            - math.log(2 * math.pi)  # log 2 pi / 2: once for p(z), twice for x, minus q's
        )
        weights = torch.softmax(log_w, 0)  # (K, B)
        # d log w / dz at fixed parameters: prior + likelihood - q
        dlogw_dz = -z + (w * residual).sum(-1) / s**2 + (z - mu) / sigma**2
        coef = -(weights**2 * dlogw_dz)  # d(-bound)/dz_k through the path, per (K, B)
        expected = [
            (coef.unsqueeze(-1) * x).sum((0, 1)),  # dz/da = x
            coef.sum(),  # dz/dc = 1
            (coef * sigma * eps).sum(),  # dz/dlog_scale = sigma eps
        ]
        bound = torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(loss.detach(), -bound.sum(), rtol=1e-12, atol=0)
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the exact posterior


def _conjugate_case(family: str) -> tuple[VAE, Tensor]:
    """p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I), and an encoder at the exact posterior."""
    g = torch.Generator().manual_seed(3)
    p, d, s = 4, 2, 0.6
    weight = torch.randn(p, d, generator=g)
    if family == "noise-scored":  # orthogonal columns: a diagonal posterior covariance
        weight = torch.linalg.qr(weight).Q * torch.tensor([1.3, 0.7])
    bias = torch.randn(p, generator=g)
    cov = torch.linalg.inv(torch.eye(d) + weight.T @ weight / s**2)
    decoder = nn.Linear(d, p)
    with torch.no_grad():
        decoder.weight.copy_(weight)
        decoder.bias.copy_(bias)
    gain = cov @ weight.T / s**2  # E[z|x] = gain (x - b)
    encoder = _ExactPosterior(gain, -gain @ bias, torch.linalg.cholesky(cov), family)
    config = VAEConfig(p, d, (4,), "full", likelihood="gaussian", likelihood_options={"scale": s})
    x = torch.randn(5, p, generator=g) * 2
    return VAE(config, encoder=encoder, decoder=decoder), x


class _ExactPosterior(nn.Module):
    """N(A x + c, L L^T) with learnable A, c and L, as one of three distribution classes."""

    def __init__(self, gain: Tensor, offset: Tensor, tril: Tensor, family: str) -> None:
        super().__init__()
        self.gain, self.offset = nn.Parameter(gain.clone()), nn.Parameter(offset.clone())
        self.log_diag = nn.Parameter(tril.diagonal().log())
        strict = torch.linalg.solve(torch.diag(tril.diagonal()), tril).tril(-1)  # L = diag (I+S)
        self.strict = nn.Parameter(strict)
        self.family = family

    def forward(self, x: Tensor) -> dist.Distribution:
        loc = x @ self.gain.T + self.offset
        scale = self.log_diag.exp().expand_as(loc)
        strict = self.strict.tril(-1).expand(*loc.shape, loc.shape[-1])
        if self.family == "noise-scored":
            return NoiseScoredNormal(loc, scale).to_event(1)
        if self.family == "triangular":
            return TriangularFactorNormal(loc, scale, strict, tril_scale=1.0)
        tril = scale.unsqueeze(-1) * (torch.eye(loc.shape[-1]) + strict)
        return dist.MultivariateNormal(loc, scale_tril=tril)


@pytest.mark.parametrize("family", ["mvn", "triangular", "noise-scored"])
def test_stl_and_dreg_encoder_gradients_vanish_at_the_exact_posterior(
    float64: None, family: str
) -> None:
    vae, x = _conjugate_case(family)
    params = list(vae.encoder.parameters())
    for exact, standard in (
        (STL_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
         Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)),
        (DReG_IWAE_ELBO(num_particles=4), IWAE_ELBO(num_particles=4)),
    ):  # fmt: skip
        pyro.set_rng_seed(11)
        zero = _grads(exact.differentiable_loss(vae.model, vae.guide, x), params)
        pyro.set_rng_seed(11)
        noisy = _grads(standard.differentiable_loss(vae.model, vae.guide, x), params)
        for g in zero:
            torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-10)
        assert max(float(g.abs().max()) for g in noisy) > 1e-2, type(standard).__name__


# ---------------------------------------------------------------- expectations


@pytest.mark.parametrize(
    ("objective", "estimator", "k"), [("elbo", "stl", 1), ("iwae", "dreg", 5)]
)
def test_expected_gradient_equals_the_standard_one(
    float64: None, objective: str, estimator: str, k: int
) -> None:
    vae, x = VAE(VAEConfig(5, 2, (6,), "full")), _x(n=3)
    pyro.set_rng_seed(21)
    ours = encoder_gradient_moments(vae, x, 16, estimator, 60, objective, k)
    pyro.set_rng_seed(22)
    standard = encoder_gradient_moments(vae, x, 16, "pathwise", 60, objective, k)
    for name, mean in ours.mean.items():
        se = ((ours.variance[name] + standard.variance[name]) / ours.num_draws).sqrt()
        assert ((mean - standard.mean[name]).abs() < 5 * se + 1e-9).all(), name


# ---------------------------------------------------------------- decoder and the API


@pytest.mark.parametrize(
    ("ours", "standard"),
    [
        (STL_ELBO(max_plate_nesting=1), Trace_ELBO(max_plate_nesting=1)),
        (DReG_IWAE_ELBO(num_particles=4), IWAE_ELBO(num_particles=4)),
    ],
    ids=["stl", "dreg"],
)
def test_decoder_gradients_are_the_standard_ones_on_the_same_draws(
    float64: None, ours: object, standard: object
) -> None:
    vae, x = VAE(VAEConfig(5, 3, (6,), "full")), _x()
    dec, enc = list(vae.decoder.parameters()), list(vae.encoder.parameters())
    results = []
    for elbo in (ours, standard):
        pyro.set_rng_seed(4)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=20)
        results.append((float(loss.detach()), _grads(loss, dec), _grads(loss, enc)))
    (value, dec_ours, enc_ours), (value_std, dec_std, enc_std) = results
    assert math.isclose(value, value_std, rel_tol=1e-12)
    for a, b in zip(dec_ours, dec_std, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float((a - b).abs().max()) for a, b in zip(enc_ours, enc_std, strict=True)) > 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda: STL_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        lambda: STL_MeanField_ELBO(max_plate_nesting=1),
        lambda: DReG_IWAE_ELBO(num_particles=3),
    ],
    ids=["stl", "stl-meanfield", "dreg"],
)
def test_loss_and_loss_and_grads_agree_with_differentiable_loss(
    float64: None, make: Callable
) -> None:
    elbo, guide = make(), "iaf"  # iaf: the mean-field KL is Monte Carlo, so STL acts
    vae, x = VAE(VAEConfig(5, 2, (6,), guide)), _x()
    params = list(vae.parameters())
    pyro.set_rng_seed(8)
    reference = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=12)
    expected = _grads(reference, params)
    pyro.set_rng_seed(8)
    loss = elbo.loss(vae.model, vae.guide, x, num_data=12)
    assert isinstance(loss, float) and math.isclose(loss, float(reference.detach()), rel_tol=1e-10)
    assert all(p.grad is None for p in params)
    pyro.set_rng_seed(8)
    with poutine.trace(param_only=True) as seen:
        value = elbo.loss_and_grads(vae.model, vae.guide, x, num_data=12)
    assert seen.trace.nodes and math.isclose(value, float(reference.detach()), rel_tol=1e-10)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_meanfield_stl_leaves_closed_form_kl_sites_and_corrects_monte_carlo_ones(
    float64: None,
) -> None:
    x = _x()
    for guide, plain, stl_like in (
        ("diagonal", TraceMeanField_ELBO, TraceMeanField_ELBO),  # analytic KL: no score term
        ("iaf", TraceMeanField_ELBO, STL_ELBO),  # Monte Carlo KL: STL_ELBO's gradient
    ):
        vae = VAE(VAEConfig(5, 2, (6,), guide))
        params = list(vae.encoder.parameters())
        grads = {}
        for key, cls in (("ours", STL_MeanField_ELBO), ("plain", plain), ("like", stl_like)):
            pyro.set_rng_seed(5)
            loss = cls(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x)
            grads[key] = _grads(loss, params)
        for a, b in zip(grads["ours"], grads["like"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        pairs = zip(grads["ours"], grads["plain"], strict=True)
        differs = any((a - b).abs().max() > 1e-6 for a, b in pairs)
        assert differs == (guide == "iaf")


@pytest.mark.parametrize("guide", ["planar", "radial", "sylvester"])
@pytest.mark.parametrize("elbo", [STL_ELBO(max_plate_nesting=1), DReG_IWAE_ELBO(3)])
def test_guides_that_score_only_their_own_draws_are_refused(guide: str, elbo: object) -> None:
    vae = VAE(VAEConfig(5, 2, (6,), guide))
    with pytest.raises(ValueError, match="scores only its own draws") as error:
        elbo.differentiable_loss(vae.model, vae.guide, _x())
    assert "\n" not in str(error.value) and "pathwise" in str(error.value)


def test_score_function_sites_are_refused() -> None:
    vae = VAE(VAEConfig(5, 2, (6,), "diagonal"))
    with pytest.raises(ValueError, match="reparameterized guide; site 'vae.z'"):
        STL_ELBO(max_plate_nesting=1).differentiable_loss(
            vae.model, score_function()(vae.guide), _x()
        )


def test_train_config_and_make_objective_pair_estimators_with_objectives() -> None:
    assert type(make_objective("elbo")) is Trace_ELBO  # the default is unchanged
    assert type(make_objective("iwae", 3)) is IWAE_ELBO
    assert type(make_objective("elbo", 1, "stl")) is STL_ELBO
    assert type(make_objective("meanfield", 2, "stl")) is STL_MeanField_ELBO
    assert type(make_objective("iwae", 3, "dreg")) is DReG_IWAE_ELBO
    assert TrainConfig().gradient_estimator == "pathwise"
    TrainConfig(objective="iwae", num_particles=5, gradient_estimator="dreg")
    for kwargs, message in (
        ({"gradient_estimator": "dreg"}, "'dreg' does not fit objective 'elbo'"),
        ({"objective": "iwae", "gradient_estimator": "stl"}, "'stl' does not fit objective"),
        ({"gradient_estimator": "reinforce"}, "unknown gradient_estimator 'reinforce'"),
        (
            {"objective": "iwae", "gradient_estimator": "dreg", "jit": True},
            "jit=True needs objective 'elbo'",
        ),
        ({"gradient_estimator": "stl", "free_bits": 0.5}, "'stl' takes no free_bits"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            TrainConfig(**kwargs)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------- command line and script


def _cli_train(tmp_path: Path, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--quiet",
            "--out", str(out), "--overwrite", *flags]  # fmt: skip
    return main(argv), out


def _check_trained(out: Path, estimator: str) -> None:
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["gradient_estimator"] == estimator
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "nan" not in rows[1]


def test_cli_trains_digits_with_dreg(tmp_path: Path) -> None:
    flags = ("--objective", "iwae", "--num-particles", "3", "--gradient-estimator", "dreg")
    status, out = _cli_train(tmp_path, *flags)
    assert status == 0
    _check_trained(out, "dreg")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--gradient-estimator", "dreg"), "'dreg' does not fit objective 'elbo'"),
        (("--objective", "iwae", "--gradient-estimator", "stl"), "'stl' does not fit"),
        (("--guide", "planar", "--gradient-estimator", "stl"), "scores only its own draws"),
    ],
)
def test_cli_estimator_mismatches_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: tuple[str, ...], message: str
) -> None:
    status, _ = _cli_train(tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("pyro-vae: error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0]
    # a bad pairing stops before training; a guide is found out by its first step
    assert len(err) == (2 if "--guide" in flags else 1)


def test_cli_trains_digits_with_stl_and_the_script_compares_estimators(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, run = _cli_train(tmp_path, "--gradient-estimator", "stl")
    assert status == 0
    _check_trained(run, "stl")
    script = load_script("gradient_variance")
    capsys.readouterr()
    argv = [str(run), "--num-points", "6", "--num-draws", "4", "--copies", "2",
            "--num-particles", "1,3", "--out", str(tmp_path / "v.png"),
            "--snr-out", str(tmp_path / "snr.png")]  # fmt: skip
    assert script.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    elbo = next(line for line in lines if line.startswith("encoder (all)")).split()
    var_score, var_path, var_stl = map(float, elbo[2:5])
    assert var_stl > 0 and var_path > 0 and var_score > var_path
    iwae = {line.split()[0]: line.split() for line in lines if line.startswith("K=")}
    assert set(iwae) == {"K=1", "K=3"}
    for name in ("v.png", "snr.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
