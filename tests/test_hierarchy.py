"""Hierarchical VAEs: L-layer densities by hand, IS log p(x) against 2-D quadrature, free bits
and KL warm-up per layer, and the generic machinery (checkpoints, resume, JIT, CLI) for L > 1."""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from robust_helpers import PIXELS, assert_jit_equals_eager, tiny_config, tiny_data, without_seconds
from torch import Tensor, nn

from pyro_vae import VAE, VAEConfig, load_checkpoint, save_checkpoint
from pyro_vae.cli import main
from pyro_vae.distributed import ELBOLoss
from pyro_vae.evaluate import evaluate, log_weights
from pyro_vae.guides import MIN_SCALE
from pyro_vae.hierarchy import (
    BottomUpPosterior,
    LadderPosterior,
    TopDownPosterior,
    merge_gaussians,
)
from pyro_vae.objectives import FreeBits_ELBO
from pyro_vae.train import fit

P = 5
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _number(value: Tensor) -> float:
    return float(value.detach())


def _binary(*shape: int) -> Tensor:
    return torch.bernoulli(torch.full(shape, 0.5))


def _hvae(inference: str = "bottom-up", sizes: tuple[int, ...] = (3, 2, 2), **options) -> VAE:
    config = VAEConfig(
        P, hidden_dims=(8,), guide="diagonal", latent_dims=sizes, inference=inference, **options
    )
    return VAE(config)


def _normal(z: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """log N(z; loc, diag scale^2) summed over the last dim, written out."""
    return (-((z - loc) ** 2) / (2 * scale**2) - scale.log() - HALF_LOG_2PI).sum(-1)


def _bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels, written out."""
    return (x * logits - F.softplus(logits)).sum(-1)


def _hand_log_q(layer: nn.Module, value: Tensor, inputs: Tensor) -> Tensor:
    """log q(value | inputs) of one Gaussian guide layer, written out (full or diagonal)."""
    q = layer(inputs)
    if isinstance(q, dist.MultivariateNormal):
        tril = q.scale_tril
        white = torch.linalg.solve_triangular(tril, (value - q.loc)[..., None], upper=False)
        log_q = -0.5 * white[..., 0].pow(2).sum(-1) - value.shape[-1] * HALF_LOG_2PI
        return log_q - tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return _normal(value, *layer.loc_scale(inputs)[:2])


def _assert_layers_score_by_hand(
    vae: VAE, guide: poutine.Trace, z: list[Tensor], inputs: list[Tensor]
) -> None:
    """Each layer's log q in the guide trace, and its gradients, equal the hand-written ones
    of the layer's guide at the given inputs."""
    expected = [
        _hand_log_q(layer, value, inp)
        for layer, value, inp in zip(vae.encoder.layers, z, inputs, strict=True)
    ]
    guide.compute_log_prob()
    for site, value in zip(vae.latent_sites, expected, strict=True):
        assert torch.allclose(guide.nodes[site]["log_prob"], value, atol=1e-10), site
    hand = sum(value.sum() for value in expected)
    _assert_same_grads(_grads(guide.log_prob_sum(), vae), _grads(hand, vae))


def _traces(vae: VAE, x: Tensor, **kwargs: object) -> tuple:
    guide = poutine.trace(vae.guide).get_trace(x, **kwargs)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, **kwargs)
    return guide, model


def _values(vae: VAE, trace: poutine.Trace) -> list[Tensor]:
    """z_1 .. z_L of a trace."""
    return [trace.nodes[site]["value"] for site in vae.latent_sites]


def _grads(loss: Tensor, vae: VAE) -> list[Tensor]:
    params = list(vae.parameters())
    return list(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))


def _assert_same_grads(a: list[Tensor], b: list[Tensor]) -> None:
    for left, right in zip(a, b, strict=True):
        left = 0.0 if left is None else left
        right = 0.0 if right is None else right
        assert torch.allclose(torch.as_tensor(left), torch.as_tensor(right), atol=1e-10)


# ---------------------------------------------------------------- densities by hand


@pytest.mark.parametrize(
    ("inference", "decoder_input"),
    [("bottom-up", "z1"), ("ladder", "z1"), ("top-down", "z1"), ("top-down", "all")],
)
def test_model_log_density_is_the_sum_of_gaussian_layers(
    float64: None, inference: str, decoder_input: str
) -> None:
    """log p(x, z) = log N(z3; 0, I) + sum_l log N(z_l; mu_l(z_{l+1}), s_l^2) + log p(x|z1),
    or log p(x | z1, z2, z3) when the decoder reads every layer."""
    vae, x = _hvae(inference, decoder_input=decoder_input), _binary(4, P)
    assert vae.latent_sites == ("vae.z1", "vae.z2", "vae.z3")
    guide, model = _traces(vae, x)
    z1, z2, z3 = _values(vae, guide)
    assert (z1.shape, z2.shape, z3.shape) == ((4, 3), (4, 2), (4, 2))
    by_site = {
        "vae.z3": _normal(z3, torch.zeros(2), torch.ones(2)),
        "vae.z2": _normal(z2, *vae.transitions[1].loc_scale(z3)),
        "vae.z1": _normal(z1, *vae.transitions[0].loc_scale(z2)),
        "vae.x": _bernoulli(
            x, vae.decoder(z1 if decoder_input == "z1" else torch.cat([z1, z2, z3], -1))
        ),
    }
    model.compute_log_prob()
    for site, expected in by_site.items():
        assert torch.allclose(model.nodes[site]["log_prob"], expected, atol=1e-10), site
    total = sum(expected.sum() for expected in by_site.values())
    assert torch.allclose(model.log_prob_sum(), total, atol=1e-10)
    _assert_same_grads(_grads(model.log_prob_sum(), vae), _grads(total, vae))  # the paths too
    # the layers are wired as documented: transitions[i] maps D_{i+2} to D_{i+1}
    assert vae.transitions[0].loc_scale(z2)[0].shape == (4, 3)
    assert vae.transitions[1].loc_scale(z3)[0].shape == (4, 2)


def test_ladder_guide_is_the_hand_merged_top_down_posterior(float64: None) -> None:
    """q(z3|x) = N(loc_hat_3, scale_hat_3^2); below, the precision-weighted product of the
    bottom-up Gaussian and p(z_l | z_{l+1}), written out; the bottom-up pass by hand too."""
    vae, x = _hvae("ladder"), _binary(4, P)
    encoder = vae.encoder
    assert isinstance(encoder, LadderPosterior)
    d = encoder.trunk(x)
    ups = [encoder.heads[0](d)]
    for up, head in zip(encoder.up, encoder.heads[1:], strict=True):
        d = up(d)
        ups.append(head(d))
    for (loc, scale), (loc_b, scale_b) in zip(ups, encoder.bottom_up(x), strict=True):
        assert torch.equal(loc, loc_b) and torch.equal(scale, scale_b)
    guide, _ = _traces(vae, x)
    z = _values(vae, guide)
    expected = {"vae.z3": _normal(z[2], *ups[2])}
    for index in (1, 0):  # z2 given z3, then z1 given z2
        prior_loc, prior_scale = vae.transitions[index].loc_scale(z[index + 1])
        loc_hat, scale_hat = ups[index]
        w_hat, w_prior = 1 / scale_hat**2, 1 / prior_scale**2
        variance = 1 / (w_hat + w_prior)
        loc = (loc_hat * w_hat + prior_loc * w_prior) * variance
        expected[vae.latent_sites[index]] = _normal(z[index], loc, variance.sqrt())
        # the merged scale is below both of its parts: the product sharpens
        assert (variance.sqrt() < torch.minimum(scale_hat, prior_scale)).all()
    guide.compute_log_prob()
    for site, value in expected.items():
        assert torch.allclose(guide.nodes[site]["log_prob"], value, atol=1e-10), site
    hand = sum(value.sum() for value in expected.values())
    _assert_same_grads(_grads(guide.log_prob_sum(), vae), _grads(hand, vae))
    # the mean reconstruction decodes the top-down chain of merged means
    mean = ups[2][0]
    for index in (1, 0):
        prior_loc, prior_scale = vae.transitions[index].loc_scale(mean)
        w_hat, w_prior = ups[index][1] ** -2, prior_scale**-2
        mean = (ups[index][0] * w_hat + prior_loc * w_prior) / (w_hat + w_prior)
    assert torch.allclose(vae.reconstruct(x), torch.sigmoid(vae.decoder(mean)), atol=1e-12)


def test_bottom_up_guide_feeds_each_layer_x_and_the_layer_below(float64: None) -> None:
    """q(z1|x) q(z2|[x, z1]) q(z3|[x, z2]) with each layer its own guide family."""
    vae = _hvae(layer_guides=("full", "diagonal", "full"))
    x = _binary(4, P)
    encoder = vae.encoder
    assert isinstance(encoder, BottomUpPosterior)
    assert [layer.__class__.__name__ for layer in encoder.layers] == [
        "FullCovarianceGuide", "DiagonalNormalGuide", "FullCovarianceGuide",
    ]  # fmt: skip
    guide, _ = _traces(vae, x)
    z = _values(vae, guide)
    inputs = [x, torch.cat([x, z[0]], -1), torch.cat([x, z[1]], -1)]
    _assert_layers_score_by_hand(vae, guide, z, inputs)
    # reconstruct decodes the mean of q(z1|x)
    expected_mean = torch.sigmoid(vae.decoder(encoder.layers[0](x).mean))
    assert torch.allclose(vae.reconstruct(x), expected_mean, atol=1e-12)


@pytest.mark.parametrize("decoder_input", ["z1", "all"])
def test_top_down_guide_feeds_each_layer_x_and_the_layer_above(
    float64: None, decoder_input: str
) -> None:
    """q(z3|x) q(z2|[x, z3]) q(z1|[x, z2]), sampled from the top, each layer its own family;
    the reconstruction decodes the chain of posterior means (all of it, or z1)."""
    vae = _hvae(
        "top-down", layer_guides=("full", "diagonal", "diagonal"), decoder_input=decoder_input
    )
    x = _binary(4, P)
    encoder = vae.encoder
    assert isinstance(encoder, TopDownPosterior)
    assert [layer.data_dim for layer in encoder.layers] == [P + 2, P + 2, P]
    guide, _ = _traces(vae, x)
    z = _values(vae, guide)
    inputs = [torch.cat([x, z[1]], -1), torch.cat([x, z[2]], -1), x]
    _assert_layers_score_by_hand(vae, guide, z, inputs)
    m3 = encoder.layers[2].loc_scale(x)[0]
    m2 = encoder.layers[1].loc_scale(torch.cat([x, m3], -1))[0]
    m1 = encoder.layers[0](torch.cat([x, m2], -1)).mean
    code = m1 if decoder_input == "z1" else torch.cat([m1, m2, m3], -1)
    assert torch.allclose(vae.encode(x), code, atol=1e-12)
    assert torch.allclose(vae.reconstruct(x), torch.sigmoid(vae.decoder(code)), atol=1e-12)


def test_guide_options_go_to_the_layers_of_the_configured_guide() -> None:
    config = VAEConfig(
        P, hidden_dims=(8,), guide="iaf", guide_options={"num_flows": 2},
        latent_dims=(3, 2), layer_guides=("diagonal", "iaf"),
    )  # fmt: skip
    vae = VAE(config)
    bottom, top = vae.encoder.layers
    assert bottom.__class__.__name__ == "DiagonalNormalGuide"
    assert top.num_flows == 2
    assert top.trunk[0].in_features == P + 3  # [x, z1]
    assert (
        VAE(VAEConfig(P, hidden_dims=(8,), guide="iaf", latent_dims=(3, 2)))
        .encoder.layers[1]
        .num_flows
        == 4
    )  # the default where no options are given


def test_merge_gaussians_is_the_normalized_product_of_densities(float64: None) -> None:
    """N(z; a) N(z; b) / N(z; merged) does not depend on z: merged is the product's shape."""
    loc_a, loc_b = torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.5])
    scale_a, scale_b = torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])
    loc, scale = merge_gaussians(loc_a, scale_a, loc_b, scale_b)
    z = torch.linspace(-3, 3, 7)[:, None].expand(7, 2)

    def log_n(z: Tensor, m: Tensor, s: Tensor) -> Tensor:
        return -((z - m) ** 2) / (2 * s**2) - s.log()

    ratio = log_n(z, loc_a, scale_a) + log_n(z, loc_b, scale_b) - log_n(z, loc, scale)
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-12)
    # the closed form: the first coordinate by hand
    variance = 1 / (1 / 0.25 + 1 / 2.25)
    assert math.isclose(float(scale[0]), math.sqrt(variance), rel_tol=1e-12)
    assert math.isclose(float(loc[0]), (0.3 / 0.25 + 2.0 / 2.25) * variance, rel_tol=1e-12)


@pytest.mark.parametrize("inference", ["bottom-up", "top-down", "ladder"])
def test_vamp_prior_on_the_top_layer_mixes_the_top_posterior(
    float64: None, inference: str
) -> None:
    """p(z_L) = 1/K sum_k N(z_L; q_0(z_L | u_k)), the layers below u_k at their means."""
    vae = _hvae(inference, (3, 2), prior="vamp", prior_options={"num_components": 4})
    u = vae.latent_prior.pseudo_inputs
    if inference == "ladder":
        loc, scale = vae.encoder.bottom_up(u)[-1]
    elif inference == "top-down":  # q(z2 | u) reads the pseudo-input alone
        loc, scale = vae.encoder.layers[1].loc_scale(u)[:2]
    else:
        bottom, top = vae.encoder.layers
        loc, scale = top.loc_scale(torch.cat([u, bottom.loc_scale(u)[0]], -1))[:2]
    z = torch.randn(6, 2)
    components = _normal(z[:, None], loc, scale)  # (6, K)
    expected = torch.logsumexp(components, -1) - math.log(4)
    assert torch.allclose(vae.prior().log_prob(z), expected, atol=1e-10)
    guide, model = _traces(vae, _binary(3, P))  # the model scores z2 under it
    model.compute_log_prob()
    z2 = guide.nodes["vae.z2"]["value"]
    assert torch.allclose(model.nodes["vae.z2"]["log_prob"], vae.prior().log_prob(z2))


# ---------------------------------------------------------------- IS log p(x) vs quadrature


class _FixedLayer(nn.Module):
    """A Gaussian layer for the one batch it is built for: N(loc + slope (z_below - center),
    scale^2), each ``(B, 1)``; z_below is the last column of its input (None: x alone)."""

    data_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.loc = self.scale = self.slope = self.center = None

    def forward(self, inputs: Tensor) -> dist.Distribution:
        loc = self.loc
        if self.slope is not None:
            loc = loc + self.slope * (inputs[..., -1:] - self.center)
        return dist.Normal(loc, self.scale).to_event(1)


class _FixedLadder(LadderPosterior):
    """The ladder posterior with fixed bottom-up Gaussians; the merge is the library's."""

    ups: list[tuple[Tensor, Tensor]]

    def bottom_up(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        return self.ups


@pytest.mark.parametrize("inference", ["bottom-up", "top-down", "ladder"])
def test_is_log_likelihood_matches_2d_quadrature(float64: None, inference: str) -> None:
    """log p(x) = log int int N(z2; 0, 1) N(z1; mu(z2), s(z2)^2) p(x|z1) dz1 dz2 on a grid,
    with the model's own transition and decoder, against IS from ``log_weights``.

    The proposals are Gaussians built from the exact posterior's moments on the same grid,
    1.5 times wider, through each scheme's own structure: bottom-up q(z1|x) q(z2|x, z1);
    top-down q(z2|x) q(z1|x, z2) with a decoder reading both layers, p(x | z1, z2); the
    ladder's q(z2|x) and the library's merge of a Gaussian message with p(z1 | z2).
    """
    pixels = _FixedLayer.data_dim
    top_down = inference == "top-down"
    config = VAEConfig(
        pixels, hidden_dims=(8,), guide="diagonal", latent_dims=(1, 1), inference=inference,
        decoder_input="all" if top_down else "z1",
    )  # fmt: skip
    if inference == "bottom-up":
        encoder = BottomUpPosterior([_FixedLayer(), _FixedLayer()])
    elif top_down:
        encoder = TopDownPosterior([_FixedLayer(), _FixedLayer()])
    else:
        encoder = _FixedLadder(pixels, (1, 1), (8,))
    vae = VAE(config, encoder=encoder)
    x = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    with torch.no_grad():
        vae.decoder.net[-1].weight.mul_(3)  # an informative likelihood
        vae.transitions[0].head.loc.weight.mul_(2)  # z1 follows z2 closely
        grid = torch.linspace(-8, 8, 801)
        step = float(grid[1] - grid[0])
        loc, scale = vae.transitions[0].loc_scale(grid[:, None])  # (G2, 1)
        if top_down:  # (G2, G1, B): the decoder reads [z1, z2]
            pairs = torch.stack(torch.meshgrid(grid, grid, indexing="ij")[::-1], -1)
            log_lik = _bernoulli(x, vae.decoder(pairs[:, :, None]))
        else:
            log_lik = _bernoulli(x, vae.decoder(grid[:, None, None]))[None]  # (1, G1, B)
        log_prior = (
            -(grid[:, None] ** 2) / 2
            - HALF_LOG_2PI
            + _normal(grid[None, :, None], loc[:, :, None], scale[:, :, None])
        )  # (G2, G1): log N(z2) + log N(z1; mu(z2), s(z2)^2)
        log_joint = log_prior[..., None] + log_lik  # (G2, G1, B)
        flat = log_joint.reshape(-1, 3)
        exact = torch.logsumexp(flat, 0) + 2 * math.log(step)
        post = torch.softmax(flat, 0).reshape(log_joint.shape)
        edges = post[[0, -1]].sum() + post[:, [0, -1]].sum()
        assert edges < 1e-8  # the grid holds the posterior
        z2, z1 = grid[:, None, None], grid[None, :, None]
        m1, m2 = (post * z1).sum((0, 1)), (post * z2).sum((0, 1))
        v1, v2 = (post * (z1 - m1) ** 2).sum((0, 1)), (post * (z2 - m2) ** 2).sum((0, 1))
        c12 = (post * (z1 - m1) * (z2 - m2)).sum((0, 1))
        col = lambda t: t[:, None]  # noqa: E731
        if inference == "bottom-up":
            bottom, top = encoder.layers
            bottom.loc, bottom.scale = col(m1), col(1.5 * v1.sqrt())
            top.loc, top.scale = col(m2), col(1.5 * (v2 - c12**2 / v1).sqrt())
            top.slope, top.center = col(c12 / v1), col(m1)
        elif top_down:
            bottom, top = encoder.layers
            top.loc, top.scale = col(m2), col(1.5 * v2.sqrt())
            bottom.loc, bottom.scale = col(m1), col(1.5 * (v1 - c12**2 / v2).sqrt())
            bottom.slope, bottom.center = col(c12 / v2), col(m2)
        else:  # the message: posterior marginal of z1 over its prior marginal
            prior = torch.softmax(log_prior.reshape(-1), 0).reshape(log_prior.shape)
            mp = (prior * grid[None, :]).sum()
            vp = (prior * (grid[None, :] - mp) ** 2).sum()
            precision = (1 / v1 - 1 / vp).clamp_min(1e-3)
            message = ((m1 / v1 - mp / vp) / precision, precision.rsqrt())
            encoder.ups = [tuple(map(col, message)), (col(m2), col(1.5 * v2.sqrt()))]
        w = log_weights(vae, x, 20000)
    log_w = w["log_lik"] + w["log_prior"] - w["log_q"]  # (K, B)
    estimate = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    ratio = (log_w - log_w.max(0).values).exp()
    std_error = ratio.std(0) / ratio.mean(0) / math.sqrt(log_w.shape[0])  # delta method
    assert std_error.max() < 0.02  # the check has teeth
    assert ((estimate - exact).abs() < 5 * std_error + 1e-4).all(), (estimate, exact)
    assert (log_w.mean(0) <= exact).all()  # the ELBO stays below
    # the per-layer KL terms add up to the KL of the whole latent
    layers = w["kl:vae.z1"] + w["kl:vae.z2"]
    assert torch.allclose(layers, w["log_q"] - w["log_prior"], atol=1e-10)


def test_log_weights_and_evaluate_split_the_kl_by_layer(float64: None) -> None:
    vae, x = _hvae("ladder"), _binary(5, P)
    pyro.set_rng_seed(3)
    w = log_weights(vae, x, 7)
    pyro.set_rng_seed(3)
    with pyro.plate("vae.particles", 7, dim=-2):
        guide, model = _traces(vae, x)
    for site in vae.latent_sites:
        q, p = guide.nodes[site], model.nodes[site]
        expected = q["fn"].log_prob(q["value"]) - p["fn"].log_prob(p["value"])
        assert w[f"kl:{site}"].shape == (7, 5)
        assert torch.allclose(w[f"kl:{site}"], expected, atol=1e-10), site
    layers = sum(w[f"kl:{site}"] for site in vae.latent_sites)
    assert torch.allclose(layers, w["log_q"] - w["log_prior"], atol=1e-10)
    pyro.set_rng_seed(3)
    with torch.no_grad():  # what evaluate draws with one particle per chunk
        chunks = [log_weights(vae, x, 1) for _ in range(7)]
    pyro.set_rng_seed(3)
    result = evaluate(vae, x, num_samples=7, max_elements=1)
    assert list(result.layer_kl) == ["z1", "z2", "z3"]
    for site in vae.latent_sites:
        mean = _number(torch.cat([chunk[f"kl:{site}"] for chunk in chunks]).mean())
        assert math.isclose(result.layer_kl[site.removeprefix("vae.")], mean, rel_tol=1e-9)
    kl = torch.cat([chunk["log_q"] - chunk["log_prior"] for chunk in chunks]).mean()
    assert math.isclose(result.kl, _number(kl), rel_tol=1e-9)
    assert math.isclose(sum(result.layer_kl.values()), result.kl, rel_tol=1e-9)
    assert result.to_dict()["layer_kl"] == result.layer_kl
    assert "layer_kl" not in evaluate(VAE(VAEConfig(P, 2, (8,), "diagonal")), x, 3).to_dict()


@pytest.mark.parametrize("inference", ["bottom-up", "top-down"])
@pytest.mark.parametrize("arch", ["mlp", "gated"])
def test_layer_guides_take_x_once_for_all_particles(
    float64: None, monkeypatch: pytest.MonkeyPatch, inference: str, arch: str
) -> None:
    """Under K particles a layer guide's trunk reads x ``(B, P)`` beside z ``(K, B, D)`` as two
    parts, and the log weights are those of trunks that read the concatenation."""
    vae, x = _hvae(inference, (3, 2), arch=arch, prior="vamp"), _binary(5, P)
    seen: list[tuple] = []
    for layer in vae.encoder.layers:
        layer.trunk.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    pyro.set_rng_seed(4)
    by_parts = log_weights(vae, x, 7)
    # the one layer that reads [x, z] under the particles (a bottom-up VampPrior also reads
    # [u, mean] of its pseudo-inputs u)
    (pair,) = [inp for inp in seen if isinstance(inp, tuple) and inp[1].dim() == 3]
    assert pair[0].shape == (5, P) and pair[1].shape == (7, 5, 2 if "top" in inference else 3)
    monkeypatch.setattr(type(vae.encoder.layers[0].trunk), "takes_parts", False)
    seen.clear()
    pyro.set_rng_seed(4)
    joined = log_weights(vae, x, 7)
    assert not any(isinstance(inp, tuple) for inp in seen)
    for key, value in by_parts.items():
        assert torch.allclose(value, joined[key], atol=1e-10), key


# ---------------------------------------------------------------- free bits and warm-up


N = 30  # the data set a minibatch of 6 stands for: scale N / B = 5


def _terms(vae: VAE, x: Tensor, seed: int, particles: int = 0) -> tuple[Tensor, list[Tensor]]:
    """The draws an ELBO makes after ``manual_seed(seed)``: log p(x|z1) by hand ``(B,)`` (or
    ``(K, B)``) and the single-draw KL_l = log q(z_l) - log p(z_l | z_{l+1}) of each layer."""
    torch.manual_seed(seed)
    plate = pyro.plate("num_particles_vectorized", particles, dim=-2) if particles else None
    with plate or nullcontext():
        guide, model = _traces(vae, x, num_data=N)
    z1 = guide.nodes[vae.latent_sites[0]]["value"]
    recon = _bernoulli(x, vae.decoder(z1))
    kls = []
    for site in vae.latent_sites:
        q, p = guide.nodes[site], model.nodes[site]
        kls.append(q["fn"].log_prob(q["value"]) - p["fn"].log_prob(p["value"]))
    return recon, kls


def test_free_bits_hold_only_the_layers_below_the_floor(float64: None) -> None:
    """lambda between the layers' minibatch KL means: -[N/B sum_b log p(x_b|z) - sum_l N
    max(lambda, mean_b KL_l)], in value and gradient; the layer under lambda is constant."""
    vae, x = _hvae("ladder", (3, 2)), _binary(6, P)
    recon, kls = _terms(vae, x, seed=5)
    means = sorted(_number(kl.mean()) for kl in kls)
    lam = (means[0] + means[1]) / 2  # one layer held, one free
    loss = FreeBits_ELBO(lam).differentiable_loss
    torch.manual_seed(5)
    value = loss(vae.model, vae.guide, x, num_data=N)
    recon, kls = _terms(vae, x, seed=5)
    kl_terms = [N * kl.mean() if _number(kl.mean()) > lam else torch.tensor(N * lam) for kl in kls]
    expected = -(N / 6 * recon.sum() - sum(kl_terms))
    assert torch.allclose(value, expected, rtol=1e-12)
    _assert_same_grads(_grads(value, vae), _grads(expected, vae))
    # not the ELBO: the floor changed the value
    elbo = -(N / 6) * (recon - sum(kls)).sum()
    assert abs(_number(value - elbo)) > 1e-3


def test_free_bits_above_every_layer_leave_only_the_reconstruction(float64: None) -> None:
    vae, x = _hvae("bottom-up", (3, 2)), _binary(6, P)
    torch.manual_seed(7)
    value = FreeBits_ELBO(100.0).differentiable_loss(vae.model, vae.guide, x, num_data=N)
    recon, kls = _terms(vae, x, seed=7)
    assert all(_number(kl.mean()) < 100 for kl in kls)
    reconstruction = -(N / 6) * recon.sum()
    assert torch.allclose(value, reconstruction + 2 * N * 100.0, rtol=1e-12)
    # the encoder still learns through z1, but no layer's KL pushes on it
    grads = _grads(value, vae)
    _assert_same_grads(grads, _grads(reconstruction, vae))
    elbo_grads = _grads(-(N / 6) * (recon - sum(kls)).sum(), vae)
    names = [name for name, _ in vae.named_parameters()]
    differs = [
        name
        for name, a, b in zip(names, grads, elbo_grads, strict=True)
        if name.startswith("encoder.") and a is not None and not torch.allclose(a, b)
    ]
    assert differs  # the KL part of the ELBO's encoder gradient is gone
    transitions = [g for n, g in zip(names, grads, strict=True) if n.startswith("transitions")]
    assert all(g is None or not g.any() for g in transitions)  # only the KL reaches them


@pytest.mark.parametrize("inference", ["bottom-up", "ladder"])
def test_zero_free_bits_are_the_elbo(float64: None, inference: str) -> None:
    vae, x = _hvae(inference, (3, 2)), _binary(6, P)
    _, kls = _terms(vae, x, seed=11)
    assert all(_number(kl.mean()) >= 0 for kl in kls)  # where the documented equality holds
    torch.manual_seed(11)
    value = FreeBits_ELBO(0.0).differentiable_loss(vae.model, vae.guide, x, num_data=N)
    torch.manual_seed(11)
    elbo = Trace_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x, num_data=N)
    assert torch.allclose(value, elbo, rtol=1e-12)
    _assert_same_grads(_grads(value, vae), _grads(elbo, vae))


def test_free_bits_average_vectorized_particles(float64: None) -> None:
    """K draws per image: the likelihood averaged over K, each layer's KL over K and B."""
    vae, x = _hvae("bottom-up", (3, 2)), _binary(6, P)
    recon, kls = _terms(vae, x, seed=2, particles=3)
    assert recon.shape == (3, 6) and kls[0].shape == (3, 6)
    lam = _number(kls[1].mean()) + 0.05  # the top layer held, the bottom one (larger) free
    assert _number(kls[0].mean()) > lam
    torch.manual_seed(2)
    elbo = FreeBits_ELBO(lam, num_particles=3)
    value = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=N)
    expected = -(N / 6 * recon.sum() / 3 - N * kls[0].mean() - N * lam)
    assert torch.allclose(value, expected, rtol=1e-12)


def test_free_bits_loss_and_svi_step_are_the_free_bits_objective(float64: None) -> None:
    vae, x = _hvae("bottom-up", (3, 2)), _binary(6, P)
    elbo = FreeBits_ELBO(100.0)
    torch.manual_seed(1)
    expected = _number(elbo.differentiable_loss(vae.model, vae.guide, x, num_data=N))
    torch.manual_seed(1)
    assert math.isclose(elbo.loss(vae.model, vae.guide, x, num_data=N), expected, rel_tol=1e-9)
    torch.manual_seed(1)
    got = elbo.loss_and_grads(vae.model, vae.guide, x, num_data=N)
    assert math.isclose(got, expected, rel_tol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_kl_warm_up_weights_every_layer(float64: None, beta: float) -> None:
    """ELBOLoss with beta: -(N/B) sum_b [log p(x_b|z) - beta sum_l KL_l]."""
    vae, x = _hvae("ladder", (3, 2)), _binary(6, P)
    loss = ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))
    loss.beta = beta
    torch.manual_seed(4)
    value = loss(x, N)
    recon, kls = _terms(vae, x, seed=4)
    expected = -(N / 6) * (recon - beta * sum(kls)).sum()
    assert torch.allclose(value, expected, rtol=1e-12)
    _assert_same_grads(_grads(value, vae), _grads(expected, vae))
    # every layer is weighted: leaving any one of them at weight 1 is another number
    for index in range(len(kls)):
        weighted = [kl if j == index else beta * kl for j, kl in enumerate(kls)]
        assert abs(_number(value + (N / 6) * (recon - sum(weighted)).sum())) > 1e-6


def test_free_bits_scale_with_the_warm_up_weight(float64: None) -> None:
    """scale_l = N/B times beta: -[N/B sum log p(x|z) - sum_l beta N max(lambda, KL_l)]."""
    vae, x = _hvae("bottom-up", (3, 2)), _binary(6, P)
    recon, kls = _terms(vae, x, seed=8)
    lam = max(_number(kl.mean()) for kl in kls) + 1.0  # every layer held
    loss = ELBOLoss(vae, FreeBits_ELBO(lam))
    loss.beta = 0.3
    torch.manual_seed(8)
    value = loss(x, N)
    assert torch.allclose(value, -(N / 6) * recon.sum() + 0.3 * 2 * N * lam, rtol=1e-12)


# ---------------------------------------------------------------- generic machinery


@pytest.mark.parametrize(
    "options",
    [
        {"inference": "ladder"},
        {"layer_guides": ("iaf", "diagonal"), "prior": "vamp", "guide": "diagonal"},
        {"inference": "top-down", "decoder_input": "all", "prior": "vamp"},
    ],
)
def test_checkpoint_round_trip_keeps_log_weights(tmp_path: Path, options: dict) -> None:
    config = VAEConfig(P, hidden_dims=(8,), latent_dims=(3, 2), **{"guide": "diagonal", **options})
    vae, x = VAE(config), _binary(4, P)
    save_checkpoint(tmp_path / "h.pt", vae, epoch=1)
    loaded, payload = load_checkpoint(tmp_path / "h.pt")
    assert loaded.config == config and payload["epoch"] == 1
    assert loaded.latent_sites == ("vae.z1", "vae.z2")
    results = []
    for model in (vae, loaded):
        pyro.set_rng_seed(6)
        with torch.no_grad():
            results.append(log_weights(model, x, 3))
    assert results[0].keys() == results[1].keys() and "kl:vae.z2" in results[0]
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def _tiny_hvae(seed: int = 0) -> VAE:
    pyro.set_rng_seed(seed)
    config = VAEConfig(
        PIXELS, hidden_dims=(8,), guide="diagonal", latent_dims=(3, 2), inference="ladder"
    )
    return VAE(config)


def test_resume_is_bit_identical_for_two_layers(tmp_path: Path) -> None:
    """Free bits and a KL warm-up that crosses the interruption, as fit logs them."""
    recipes = {"free_bits": 0.2, "kl_warmup": 2}
    full = _tiny_hvae()
    full_history = fit(full, tiny_data(), tiny_config(4, **recipes), tmp_path / "full", False)
    fit(_tiny_hvae(), tiny_data(), tiny_config(2, **recipes), tmp_path / "part", False)
    torch.manual_seed(12345)  # what a fresh process would start from
    random.seed(678)
    np.random.seed(910)
    pyro.clear_param_store()
    resumed = _tiny_hvae(seed=99)  # another initialization: last.pt must overwrite it
    history = fit(
        resumed, tiny_data(), tiny_config(4, **recipes), tmp_path / "part", False, resume=True
    )
    assert [row["kl_weight"] for row in history] == [0.0, 0.5, 1.0, 1.0]
    assert without_seconds(history) == without_seconds(full_history)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert any(key.startswith("transitions.") for key in full.state_dict())


@pytest.mark.parametrize("inference", ["bottom-up", "top-down", "ladder"])
def test_jit_loss_equals_the_eager_loss(float64: None, inference: str) -> None:
    vae, x = _hvae(inference, (3, 2), decoder_input="all"), _binary(7, P)
    assert_jit_equals_eager(vae, x, betas=(1.0, 0.25))  # every layer's KL weighted


def test_predictive_samples_and_reconstructions_have_every_layer() -> None:
    vae = _hvae("ladder")
    draws = Predictive(vae.model, num_samples=2)(batch_size=3)
    shapes = {name: tuple(value.shape) for name, value in draws.items()}
    assert shapes == {
        "vae.z1": (2, 3, 3), "vae.z2": (2, 3, 2), "vae.z3": (2, 3, 2), "vae.x": (2, 3, P),
    }  # fmt: skip
    images = vae.sample_images(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, P) and ((images > 0) & (images < 1)).all()
    again = vae.sample_images(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    assert not torch.allclose(images[0], images[1])  # distinct prior draws
    x = _binary(4, P)
    assert vae.reconstruct(x).shape == (4, P)
    assert _hvae("bottom-up").reconstruct(x).shape == (4, P)


def test_sample_images_draw_through_every_transition(float64: None) -> None:
    """Ancestral sampling: z1 ~ p(z1 | z2) with z2 ~ N(0, I), read back from the images.

    p(z1 | z2) is set to N(3, 2^2) and the decoder to logits = z1[0] on every pixel, so the
    images are sigmoid(z1[0]): their logits must have mean 3 and standard deviation 2.
    """
    decoder = nn.Linear(2, P)
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.weight[:, 0] = 1.0
        decoder.bias.zero_()
    config = VAEConfig(P, hidden_dims=(8,), guide="diagonal", latent_dims=(2, 2))
    vae = VAE(config, decoder=decoder)
    head = vae.transitions[0].head
    with torch.no_grad():
        for layer in (head.loc, head.raw_scale):
            layer.weight.zero_()
        head.loc.bias.fill_(3.0)
        head.raw_scale.bias.fill_(math.log(math.expm1(2.0 - MIN_SCALE)))
    assert torch.allclose(vae.transitions[0].loc_scale(torch.randn(3, 2))[1], torch.tensor(2.0))
    images = vae.sample_images(4000, generator=torch.Generator().manual_seed(0))
    z1 = torch.logit(images[:, 0])
    assert torch.allclose(images, images[:, :1].expand_as(images))
    assert abs(float(z1.mean()) - 3.0) < 0.15  # 4.7 standard errors
    assert abs(float(z1.std()) - 2.0) < 0.1  # 4.5 standard errors


def test_cli_trains_a_ladder_with_free_bits_and_reports_kl_per_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "ladder"
    flags = [
        "train", "--epochs", "1", "--latent-dims", "3,2", "--inference", "ladder",
        "--free-bits", "0.1", "--hidden-dims", "16", "--out", str(run), "--quiet",
    ]  # fmt: skip
    assert main(flags) == 2  # the default guide (full) cannot be merged
    error = capsys.readouterr().err.strip()
    assert "inference 'ladder' and guide 'full' do not fit" in error and "\n" not in error
    assert main([*flags, "--guide", "diagonal"]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["latent_dims"] == [3, 2]
    assert stored["model"]["inference"] == "ladder"
    assert stored["train"]["free_bits"] == 0.1
    capsys.readouterr()
    evaluate_flags = ["evaluate", str(run), "--num-samples", "10", "--num-points", "50"]
    assert main([*evaluate_flags, "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["layer_kl"]) == {"z1", "z2"}
    total = sum(result["layer_kl"].values())
    assert math.isclose(total, result["kl"], rel_tol=1e-6)
    assert math.isclose(result["elbo"], result["reconstruction"] - result["kl"], rel_tol=1e-6)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"guide": "iaf", "inference": "ladder"}, ("inference 'ladder'", "guide 'iaf'")),
        ({"layer_guides": ("diagonal",)}, ("layer_guides", "(2)")),
        ({"layer_guides": ("diagonal", "iaf", "iaf")}, ("layer_guides", "(2)")),
        ({"guide": "vmf"}, ("guide 'vmf'", "latent_dims [3, 3]")),
        ({"layer_guides": ("diagonal", "vmf")}, ("guide 'vmf'", "latent_dims [3, 3]")),
        ({"inference": "sideways"}, ("inference 'sideways'", "bottom-up, ladder, top-down")),
        ({"decoder_input": "z2"}, ("decoder_input 'z2'", "all, z1")),
    ],
)
def test_config_errors_are_one_line_naming_both_parts(options: dict, names: tuple) -> None:
    settings = {"guide": "diagonal", "latent_dims": (3, 3), **options}
    with pytest.raises(ValueError) as error:
        VAEConfig(P, hidden_dims=(8,), **settings)
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


def test_ladder_error_names_the_layer_guide_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="inference 'ladder' and guide 'iaf' do not fit"):
        VAEConfig(
            P, hidden_dims=(8,), guide="diagonal", latent_dims=(3, 3),
            layer_guides=("diagonal", "iaf"), inference="ladder",
        )  # fmt: skip
    with pytest.raises(ValueError, match="inference 'ladder' and guide 'iaf' do not fit"):
        VAEConfig(
            P, hidden_dims=(8,), guide="iaf", latent_dims=(3, 3),
            layer_guides=("diagonal", "diagonal"), inference="ladder",
        )  # fmt: skip
