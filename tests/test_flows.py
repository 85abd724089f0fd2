"""Flow guides: log-densities against autograd Jacobians, invertibility, one-pass scoring, CLI."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_vae import VAE, VAEConfig, load_checkpoint
from pyro_vae.cli import main
from pyro_vae.guides import (
    GUIDES,
    ConditionedHouseholderSylvester,
    FlowGuide,
    PlanarGuide,
    make_guide,
)
from pyro_vae.guides.flows import PLANAR_MARGIN
from pyro_vae.guides.sylvester import reflect

FLOWS = sorted(key for key, cls in GUIDES.items() if issubclass(cls, FlowGuide))


def _images(num_images: int, data_dim: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((num_images, data_dim), 0.5))


def _row_map(transform: torch.distributions.Transform, z: torch.Tensor, b: int):
    """The map of datapoint b's latent alone: (D,) -> (D,), other rows held at z."""

    def f(v: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([z[:b], v.unsqueeze(0), z[b + 1 :]])
        return transform._call(rows)[b]  # bypass the cache: a fresh forward pass

    return f


@pytest.mark.parametrize("latent_dim", [2, 3, 4])
@pytest.mark.parametrize("key", FLOWS)
def test_log_q_equals_base_minus_log_det_jacobians(key: str, latent_dim: int, float64) -> None:
    q = make_guide(key, 5, latent_dim, (7,), num_flows=3)
    x = _images(3, 5)
    with torch.no_grad():
        for p in q.parameters():  # move off the near-identity initialization
            p.add_(0.3 * torch.randn_like(p))
    post = q(x)
    z0 = post.base_dist.rsample()
    zs = [z0]
    for t in post.transforms:
        zs.append(t(zs[-1]))
    log_q = post.log_prob(zs[-1])  # scored from the cache, as in training

    loc, scale, _ = q.loc_scale(x)
    log_q0 = (-((z0 - loc) / scale).pow(2) / 2 - scale.log() - math.log(2 * math.pi) / 2).sum(-1)
    for b in range(x.shape[0]):
        log_det = 0.0
        for k, t in enumerate(post.transforms):
            jac = jacobian(_row_map(t, zs[k].detach(), b), zs[k][b].detach())
            log_det = log_det + torch.linalg.slogdet(jac)[1]
        expected = log_q0[b] - log_det
        assert torch.allclose(log_q[b], expected, atol=1e-6, rtol=0), (key, b)


@pytest.mark.parametrize("key", FLOWS)
def test_sampling_and_scoring_take_one_pass(key: str) -> None:
    """log q of a fresh sample never inverts a map: each map runs exactly once."""
    q = make_guide(key, 6, 3, (8,), num_flows=2)
    post = q(_images(4, 6))
    calls = {"forward": 0}
    for t in post.transforms:
        original = t._call

        def counted(x: torch.Tensor, original=original) -> torch.Tensor:
            calls["forward"] += 1
            return original(x)

        t._call = counted
        t._inverse = lambda y: pytest.fail("a map was inverted")  # noqa: B023
    z = post.rsample((5,))
    log_q = post.log_prob(z)
    assert calls["forward"] == len(post.transforms)
    assert log_q.shape == (5, 4) and log_q.isfinite().all()


def _planar_condition(flow: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """w . u_hat per datapoint ``(B,)`` of one conditional planar map."""
    t = flow.condition(h)
    _, u, w = flow.nn(h)
    return (t.u_hat(u, w) * w).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planar_keeps_w_dot_u_above_minus_one_for_any_parameters(dtype: torch.dtype) -> None:
    flow = make_guide("planar", 4, 3, (6,)).flows[0]
    u = 10 * torch.randn(2000, 3, dtype=dtype)
    w = torch.randn(2000, 3, dtype=dtype)
    u[:4], w[:4] = torch.tensor([-1e3, 0, 0]), torch.tensor([1.0, 0, 0])  # w.u = -1000
    bias = torch.zeros(2000, 1, dtype=dtype)  # a = w.z + b = 0 at z = 0
    t = flow.condition(None)
    t._params = (bias, u, w)
    w_dot_u_hat = (t.u_hat(u, w) * w).sum(-1)
    assert (w_dot_u_hat > -1).all()
    assert ((u * w).sum(-1) < -40).any() and ((u * w).sum(-1) > 0).any()  # both regimes
    # det J = 1 + tanh'(a) w.u_hat stays positive: log det finite even at a = 0, w.u = -1000
    z = torch.zeros(2000, 3, dtype=dtype)
    log_det = t.log_abs_det_jacobian(z, t(z))
    assert log_det.isfinite().all() and (log_det >= math.log(PLANAR_MARGIN) - 1e-3).all()
    # at a = 0, tanh' = 1: det J = 1 + w.u_hat = softplus(w.u) + delta exactly
    alpha = (u.double() * w.double()).sum(-1)
    expected = torch.log(torch.nn.functional.softplus(alpha) + PLANAR_MARGIN)
    assert torch.allclose(log_det.double(), expected, rtol=1e-5, atol=1e-5)


def test_planar_invertible_after_init_and_after_training() -> None:
    config = VAEConfig(8, 2, (10,), "planar", {"num_flows": 3})
    vae = VAE(config)
    x = _images(64, 8)
    guide = vae.encoder
    assert isinstance(guide, PlanarGuide)
    h = guide.trunk(x)
    for flow in guide.flows:
        assert (_planar_condition(flow, h) > -1).all()
    optimizer = torch.optim.Adam(vae.parameters(), lr=0.05)
    loss_fn = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss
    before = [p.detach().clone() for p in guide.parameters()]
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(vae.model, vae.guide, x).backward()
        optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, guide.parameters(), strict=True))
    h = guide.trunk(torch.cat([x, _images(64, 8)]))
    for flow in guide.flows:
        assert (_planar_condition(flow, h) > -1).all()
    # and each map is monotone along its own direction: det J = 1 + tanh' w.u_hat > 0
    post = guide(x)
    z = post.rsample((10,))
    assert post.log_prob(z).isfinite().all()


def test_householder_vectors_give_an_orthogonal_q(float64) -> None:
    vectors = torch.randn(5, 4)
    t = ConditionedHouseholderSylvester(
        torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4), vectors
    )
    q = t._q(torch.eye(4)).T  # columns Q e_i
    assert torch.allclose(q @ q.T, torch.eye(4), atol=1e-12)
    assert torch.allclose(t._q_transpose(torch.eye(4)).T, q.T, atol=1e-12)
    v = torch.randn(4)
    assert torch.allclose(reflect(v, v), -v, atol=1e-12)


def test_sylvester_inverse_is_refused_for_foreign_points() -> None:
    post = make_guide("sylvester", 6, 3, (8,))(_images(2, 6))
    with pytest.raises(NotImplementedError, match="own samples"):
        post.log_prob(torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_flows": 0}, "num_flows"),
        ({"flow_hidden_dims": (2,)}, "flow_hidden_dims"),
        ({"flow_hidden_dims": ()}, "hidden_dims"),
    ],
)
def test_bad_flow_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_guide("iaf", 6, 3, (8,), **options)


def test_cli_records_flow_options_and_rebuilds_them(tmp_path, capsys) -> None:
    data = tmp_path / "data.npy"
    import numpy as np

    np.save(data, np.random.default_rng(0).integers(0, 2, (160, 16)).astype(np.float32))
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--guide", "iaf", "--num-flows", "2"]
    argv += ["--flow-hidden-dims", "12,12", "--latent-dim", "3", "--hidden-dims", "8"]
    assert main([*argv, "--epochs", "1", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    vae, _ = load_checkpoint(out / "checkpoint.pt")
    assert vae.config.guide_options == {"num_flows": 2, "flow_hidden_dims": [12, 12]}
    assert len(vae.encoder.flows) == 2 and vae.encoder.flow_hidden_dims == (12, 12)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "valid", "--num-samples", "3", "--quiet"]) == 0
    bad = ["train", "--data", str(data), "--guide", "diagonal", "--num-flows", "2"]
    assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
    assert "--num-flows" in capsys.readouterr().err
