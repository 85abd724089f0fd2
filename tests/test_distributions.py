"""Our distributions against torch's reference ones: values, gradients and draws."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.distributions import (
    CholeskyMultivariateNormal,
    DiagonalNormalMixture,
    NoiseScoredNormal,
    StandardNormal,
    TriangularFactorNormal,
)
from pyro_vae.guides import make_guide


def _random_factor(batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    loc = torch.randn(batch, dim, requires_grad=True)
    raw = torch.randn(batch, dim, dim).tril(-1) + torch.diag_embed(torch.rand(batch, dim) + 0.5)
    return loc, raw.requires_grad_()


@pytest.mark.parametrize("sample_shape", [(), (3,)])
def test_own_draw_log_prob_and_gradient_match_mahalanobis_form(
    float64: None, sample_shape: tuple[int, ...]
) -> None:
    loc, tril = _random_factor(4, 5)
    q = CholeskyMultivariateNormal(loc, scale_tril=tril)
    z = q.rsample(sample_shape)
    fast = q.log_prob(z)
    # the reference scores a copy, so it must take the triangular-solve path
    slow = dist.MultivariateNormal(loc, scale_tril=tril).log_prob(z + 0.0)
    assert fast.shape == (*sample_shape, 4)
    assert torch.allclose(fast, slow, rtol=0, atol=1e-10)
    # total derivatives through z = loc + L eps; d/d loc is 0 in both forms
    grads_fast = torch.autograd.grad(fast.sum(), (loc, tril), materialize_grads=True)
    grads_slow = torch.autograd.grad(slow.sum(), (loc, tril))
    assert torch.allclose(grads_fast[0], grads_slow[0], rtol=0, atol=1e-9)
    # L is lower triangular: entries above the diagonal are not parameters of q
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.allclose(grads_fast[1][:, lower], grads_slow[1][:, lower], rtol=0, atol=1e-9)


def test_other_values_take_the_general_path(float64: None) -> None:
    loc, tril = _random_factor(2, 3)
    q = CholeskyMultivariateNormal(loc, scale_tril=tril)
    q.rsample()
    other = torch.randn(2, 3)
    expected = dist.MultivariateNormal(loc, scale_tril=tril).log_prob(other)
    assert torch.allclose(q.log_prob(other), expected, rtol=0, atol=1e-12)


def test_expanded_under_a_particle_plate_scores_like_mvn(float64: None) -> None:
    """Pyro expands the guide's distribution under plates; the subclass and cache survive."""
    loc, tril = _random_factor(4, 3)

    def guide() -> None:
        with pyro.plate("particles", 6, dim=-2), pyro.plate("data", 4, dim=-1):
            pyro.sample("z", CholeskyMultivariateNormal(loc, scale_tril=tril))

    site = pyro.poutine.trace(guide).get_trace().nodes["z"]
    assert type(site["fn"]) is CholeskyMultivariateNormal and site["value"].shape == (6, 4, 3)
    expected = dist.MultivariateNormal(loc, scale_tril=tril).log_prob(site["value"] + 0.0)
    assert torch.allclose(site["fn"].log_prob(site["value"]), expected, rtol=0, atol=1e-10)


def test_full_guide_uses_the_cheap_path(float64: None) -> None:
    q = make_guide("full", data_dim=6, latent_dim=3, hidden_dims=(8,))
    with torch.no_grad():
        q.tril.weight.normal_()  # a non-diagonal L
    post = q(torch.bernoulli(torch.full((4, 6), 0.5)))
    assert isinstance(post, CholeskyMultivariateNormal)
    z = post.rsample((2,))
    reference = dist.MultivariateNormal(post.loc, scale_tril=post.scale_tril)
    assert torch.allclose(post.log_prob(z), reference.log_prob(z + 0.0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["scaled", "plain"])
def test_full_guide_factor_layout(float64: None, parameterization: str) -> None:
    """L from the flat head: row-major strictly-lower entries, diagonal sigma."""
    q = make_guide("full", 6, 4, (8,), parameterization=parameterization, tril_scale=0.5)
    with torch.no_grad():
        q.tril.bias.copy_(torch.arange(1.0, 7.0))
        q.tril.weight.normal_()
    x = torch.bernoulli(torch.full((2, 6), 0.5))
    loc, tril = q.scale_tril(x)
    sigma = q.loc_scale(x)[1]
    expected = torch.zeros(2, 4, 4)
    k = 0
    for i in range(4):
        for j in range(i):
            k += 1
            expected[:, i, j] = float(k) + q.trunk(x) @ q.tril.weight[k - 1]
    if parameterization == "scaled":
        expected = sigma[:, :, None] * (torch.eye(4) + 0.5 * expected)
    else:
        expected = expected + torch.diag_embed(sigma)
    assert torch.allclose(tril, expected, rtol=0, atol=1e-12)


def test_draw_without_a_graph_gets_the_score_function_gradient(float64: None) -> None:
    """sample() keeps no graph: d log q / d theta must hold z fixed, as MultivariateNormal's."""
    loc = torch.randn(3, 4, requires_grad=True)
    raw = torch.randn(3, 4, 4)
    tril = (raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())).requires_grad_()
    q = CholeskyMultivariateNormal(loc, scale_tril=tril)
    z = q.sample()
    cheap = torch.autograd.grad(q.log_prob(z).sum(), (loc, tril))
    exact = torch.autograd.grad(
        torch.distributions.MultivariateNormal(loc, scale_tril=tril).log_prob(z).sum(), (loc, tril)
    )
    for a, b in zip(cheap, exact, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tril_scale", [0.3, None])
@pytest.mark.parametrize("sample_shape", [(), (2,)])
def test_factored_draw_matches_the_explicit_cholesky_path(
    float64: None, tril_scale: float | None, sample_shape: tuple[int, ...]
) -> None:
    """z = loc + L eps and log q(z) with L never formed: values and gradients as with L."""
    loc = torch.randn(3, 4, requires_grad=True)
    scale = torch.rand(3, 4).add(0.5).requires_grad_()
    strict = torch.randn(3, 4, 4).tril(-1).requires_grad_()
    q = TriangularFactorNormal(loc, scale, strict, tril_scale)
    torch.manual_seed(5)
    z = q.rsample(sample_shape)
    cheap = q.log_prob(z).sum() + z.square().sum()  # a function of z and of log q(z)
    if tril_scale is None:
        tril = strict + torch.diag_embed(scale)
    else:
        tril = scale.unsqueeze(-1) * (torch.eye(4) + tril_scale * strict)
    torch.manual_seed(5)  # the same eps
    eps = torch.randn(*sample_shape, 3, 4)
    z_ref = loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
    reference = dist.MultivariateNormal(loc, scale_tril=tril)
    exact = reference.log_prob(z_ref).sum() + z_ref.square().sum()
    assert torch.allclose(z, z_ref, rtol=0, atol=1e-12)
    assert torch.allclose(q.scale_tril, tril, rtol=0, atol=0)
    assert torch.allclose(cheap, exact, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(cheap, (loc, scale, strict))
    expected = torch.autograd.grad(exact, (loc, scale, strict))
    lower = torch.ones(4, 4).tril(-1)  # S's only free entries
    for a, b, mask in zip(grads, expected, (1, 1, lower), strict=True):
        assert torch.allclose(a * mask, b * mask, rtol=1e-10, atol=1e-12)
    wide = q.expand((5, 3))  # particles: still factored, same distribution
    assert isinstance(wide, TriangularFactorNormal) and wide.batch_shape == (5, 3)
    other = torch.randn(5, 3, 4)
    assert torch.allclose(wide.log_prob(other), reference.log_prob(other), atol=1e-12)


def test_noise_scored_normal_matches_normal_in_value_and_total_gradient(float64: None) -> None:
    loc = torch.randn(3, 4, requires_grad=True)
    scale = torch.rand(3, 4).add(0.2).requires_grad_()
    q = NoiseScoredNormal(loc, scale).to_event(1)
    torch.manual_seed(0)
    z = q.rsample((2,))
    cheap = q.log_prob(z).sum() + z.pow(3).sum()
    torch.manual_seed(0)
    z_ref = dist.Normal(loc, scale).to_event(1).rsample((2,))
    exact = dist.Normal(loc, scale).to_event(1).log_prob(z_ref).sum() + z_ref.pow(3).sum()
    assert torch.allclose(cheap, exact, rtol=1e-12, atol=0)
    for a, b in zip(
        torch.autograd.grad(cheap, (loc, scale)),
        torch.autograd.grad(exact, (loc, scale)),
        strict=True,
    ):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    other = torch.randn(3, 4)  # not its own draw: the usual formula
    expected = dist.Normal(loc, scale).log_prob(other)
    assert torch.allclose(NoiseScoredNormal(loc, scale).log_prob(other), expected, atol=1e-12)
    drawn = NoiseScoredNormal(loc, scale)
    fixed = drawn.sample()  # no graph: the score-function gradient holds z fixed
    grads = torch.autograd.grad(drawn.log_prob(fixed).sum(), (loc, scale))
    reference = torch.autograd.grad(dist.Normal(loc, scale).log_prob(fixed).sum(), (loc, scale))
    for a, b in zip(grads, reference, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_standard_normal_is_normal_zero_one(float64: None) -> None:
    p = StandardNormal(torch.zeros(3), torch.ones(3))
    z = torch.randn(5, 3) * 3
    assert torch.allclose(p.log_prob(z), dist.Normal(0.0, 1.0).log_prob(z), rtol=0, atol=1e-12)
    wide = p.expand((5, 3))
    assert isinstance(wide, StandardNormal)
    assert wide.log_prob(torch.zeros(3)).shape == (5, 3)  # broadcast to the batch
    kl = torch.distributions.kl_divergence(dist.Normal(torch.ones(3), 2.0), p)
    assert torch.allclose(
        kl, torch.distributions.kl_divergence(dist.Normal(1.0, 2.0), dist.Normal(0.0, 1.0))
    )


def _mixture_params(k: int, d: int) -> tuple[torch.Tensor, ...]:
    locs = torch.randn(k, d, requires_grad=True)
    scales = torch.rand(k, d).add(0.05).requires_grad_()
    logits = torch.randn(k, requires_grad=True)
    return locs, scales, logits


def _reference_mixture(
    locs: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor
) -> dist.MixtureSameFamily:
    components = dist.Normal(locs, scales).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


@pytest.mark.parametrize("shape", [(), (6,), (3, 4)])
def test_mixture_by_matrix_products_matches_the_broadcast_mixture(
    float64: None, shape: tuple[int, ...]
) -> None:
    params = _mixture_params(5, 3)
    z = 2 * torch.randn(*shape, 3)
    fast = DiagonalNormalMixture(*params).log_prob(z)
    slow = _reference_mixture(*params).log_prob(z)
    assert fast.shape == shape
    assert torch.allclose(fast, slow, rtol=0, atol=1e-10)
    for a, b in zip(
        torch.autograd.grad(fast.sum(), params),
        torch.autograd.grad(slow.sum(), params),
        strict=True,
    ):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_mixture_in_float32_stays_close_to_the_float64_density() -> None:
    """The expanded quadratic form cancels: about 1e-3 nats at scales down to 0.05 in float32."""
    locs, scales, logits = (p.detach() for p in _mixture_params(100, 40))
    z = locs[torch.randint(100, (2000,))] + scales.min() * torch.randn(2000, 40)
    fast = DiagonalNormalMixture(locs, scales, logits).log_prob(z).double()
    exact = _reference_mixture(locs.double(), scales.double(), logits.double()).log_prob(
        z.double()
    )
    assert (fast - exact).abs().max() < 5e-3


def test_mixture_draws_have_the_mixture_moments() -> None:
    torch.manual_seed(0)
    locs, scales, logits = (p.detach() for p in _mixture_params(3, 2))
    p = DiagonalNormalMixture(locs, scales, logits)
    draws = p.sample((200000,))
    reference = _reference_mixture(locs, scales, logits)
    assert draws.shape == (200000, 2) and not draws.requires_grad
    assert torch.allclose(draws.mean(0), reference.mean, atol=0.02)
    assert torch.allclose(draws.var(0), reference.variance, rtol=0.03)


def test_mixture_under_a_plate_and_bad_shapes(float64: None) -> None:
    p = DiagonalNormalMixture(*_mixture_params(4, 2))
    with pyro.plate("data", 5):
        trace = pyro.poutine.trace(lambda: pyro.sample("z", p)).get_trace()
    site = trace.nodes["z"]
    assert site["value"].shape == (5, 2) and site["fn"].batch_shape == (5,)
    assert torch.allclose(site["fn"].log_prob(site["value"]), p.log_prob(site["value"]))
    with pytest.raises(ValueError, match=r"locs and scales must be \(K, D\)"):
        DiagonalNormalMixture(torch.zeros(4, 2), torch.ones(4, 3), torch.zeros(4))
