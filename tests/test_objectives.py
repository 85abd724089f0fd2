"""Objectives: analytic KL, IWAE bound, score-function vs pathwise encoder gradients."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from script_loader import load_script
from torch.distributions import kl_divergence

from pyro_vae.cli import main
from pyro_vae.evaluate import log_weights
from pyro_vae.model import VAE, VAEConfig
from pyro_vae.objectives import (
    IWAE_ELBO,
    encoder_gradient_moments,
    make_objective,
    score_function,
)
from pyro_vae.train import TrainConfig


def _random_mvn(batch: int, dim: int) -> dist.MultivariateNormal:
    loc = torch.randn(batch, dim)
    tril = torch.randn(batch, dim, dim).tril(-1) + torch.diag_embed(torch.rand(batch, dim) + 0.5)
    return dist.MultivariateNormal(loc, scale_tril=tril)


def _tiny_vae(latent_dim: int = 1, data_dim: int = 3, guide: str = "diagonal") -> VAE:
    return VAE(VAEConfig(data_dim, latent_dim, (4,), guide))


def _x(n: int = 4, data_dim: int = 3) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, data_dim), 0.5))


def _grid_log_joint(vae: VAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x_b, z_g) on a 1-D grid z ``(G,)``, shape ``(G, B)``."""
    logits = vae.decoder(z.unsqueeze(-1)).unsqueeze(1)  # (G, 1, P)
    log_lik = dist.Bernoulli(logits=logits).log_prob(x).sum(-1)  # (G, B)
    return log_lik + dist.Normal(0.0, 1.0).log_prob(z).unsqueeze(-1)


def _quadrature_log_px(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    z = torch.linspace(-12, 12, 6001)
    with torch.no_grad():
        return torch.logsumexp(_grid_log_joint(vae, x, z), 0) + math.log(float(z[1] - z[0]))


# ---------------------------------------------------------------- analytic KL


def test_closed_form_kl_matches_torch_mvn_kl_and_monte_carlo(float64: None) -> None:
    p = _random_mvn(3, 4)
    q = dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5).to_event(1)
    closed = kl_divergence(p, q)
    as_mvn = torch.distributions.MultivariateNormal(
        q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale)
    )
    torch.testing.assert_close(closed, kl_divergence(p, as_mvn))
    z = p.sample((20000,))
    terms = p.log_prob(z) - q.log_prob(z)  # (S, 3)
    se = terms.std(0) / math.sqrt(z.shape[0])
    assert ((terms.mean(0) - closed).abs() < 3 * se).all()


def test_closed_form_kl_refuses_other_families() -> None:
    p = _random_mvn(2, 3)
    q = dist.Laplace(torch.zeros(2, 3), 1.0).to_event(1)
    with pytest.raises(NotImplementedError):
        kl_divergence(p, q)


def test_meanfield_elbo_is_exact_when_the_likelihood_ignores_z(float64: None) -> None:
    vae = _tiny_vae(latent_dim=3, guide="full")
    last = vae.decoder.net[-1]
    torch.nn.init.zeros_(last.weight)  # p(x|z) no longer depends on z
    x = _x()
    with torch.no_grad():
        post = vae.encoder(x)
        kl = kl_divergence(
            torch.distributions.MultivariateNormal(post.loc, scale_tril=post.scale_tril),
            torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3)),
        )
        log_lik = dist.Bernoulli(logits=last.bias).log_prob(x).sum(-1)
        expected = -(log_lik - kl).sum()
        meanfield = TraceMeanField_ELBO(max_plate_nesting=1)
        draws = torch.stack(
            [meanfield.differentiable_loss(vae.model, vae.guide, x) for _ in range(3)]
        )
        w = log_weights(vae, x, 4000)  # Monte Carlo: -(log p(x|z) + log p(z) - log q(z|x))
        mc = -(w["log_lik"] + w["log_prior"] - w["log_q"]).sum(-1)
    torch.testing.assert_close(draws, expected.expand(3))  # no sampling noise at all
    assert abs(mc.mean() - expected) < 3 * mc.std() / math.sqrt(len(mc))


# ---------------------------------------------------------------- IWAE


def test_iwae_loss_and_gradients_equal_renyi_alpha_zero(float64: None) -> None:
    vae, x = _tiny_vae(latent_dim=2), _x()
    pyro.set_rng_seed(1)
    loss = IWAE_ELBO(num_particles=7).differentiable_loss(vae.model, vae.guide, x)
    ours = torch.autograd.grad(loss, list(vae.parameters()))
    pyro.set_rng_seed(1)
    renyi = RenyiELBO(alpha=0, num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    with pyro.poutine.trace(param_only=True) as params:
        reference = renyi.loss_and_grads(vae.model, vae.guide, x)
    assert params.trace.nodes  # parameters were seen, so Renyi backpropagated
    assert math.isclose(float(loss.detach()), reference, rel_tol=1e-10)
    for mine, p in zip(ours, vae.parameters(), strict=True):
        torch.testing.assert_close(mine, p.grad)


def test_iwae_under_subsampling_scales_the_bound_not_the_weights(float64: None) -> None:
    vae, x = _tiny_vae(latent_dim=2), _x()
    iwae = IWAE_ELBO(num_particles=5)
    pyro.set_rng_seed(3)
    plain = iwae.differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    scaled = iwae.differentiable_loss(vae.model, vae.guide, x, num_data=40)
    torch.testing.assert_close(scaled, plain * 10)


def _subsampled_iwae_case() -> tuple[VAE, torch.Tensor, dict]:
    """A small VAE, a batch of B = 4 from a data set of N = 40, K = 8 (so N/B = 10)."""
    vae = VAE(VAEConfig(6, 2, (8,), "diagonal"))
    return vae, _x(n=4, data_dim=6), {"num_data": 40}


def test_iwae_loss_and_loss_and_grads_match_differentiable_loss_under_subsampling(
    float64: None,
) -> None:
    vae, x, kw = _subsampled_iwae_case()
    iwae, params = IWAE_ELBO(num_particles=8), list(vae.parameters())
    pyro.set_rng_seed(5)
    reference = iwae.differentiable_loss(vae.model, vae.guide, x, **kw)
    expected_grads = torch.autograd.grad(reference, params)
    expected = float(reference.detach())
    pyro.set_rng_seed(5)  # independent: N/B * sum_b -(logsumexp_k log w_kb - log K)
    with torch.no_grad():
        w = log_weights(vae, x, 8)
    log_w = w["log_lik"] + w["log_prior"] - w["log_q"]
    independent = 10 * float(-(torch.logsumexp(log_w, 0) - math.log(8)).sum())
    assert math.isclose(expected, independent, rel_tol=1e-12)

    pyro.set_rng_seed(5)
    loss = iwae.loss(vae.model, vae.guide, x, **kw)
    assert isinstance(loss, float) and math.isclose(loss, expected, rel_tol=1e-12)
    assert all(p.grad is None for p in params)  # loss builds and leaves no gradients
    pyro.set_rng_seed(5)
    with pyro.poutine.trace(param_only=True) as seen:
        value = iwae.loss_and_grads(vae.model, vae.guide, x, **kw)
    assert seen.trace.nodes and isinstance(value, float)
    assert math.isclose(value, expected, rel_tol=1e-12)
    for g, p in zip(expected_grads, params, strict=True):
        torch.testing.assert_close(p.grad, g)
    # Renyi's own loss puts N/B inside the log-mean-exp: a different (smaller) number here.
    pyro.set_rng_seed(5)
    assert expected - RenyiELBO.loss(iwae, vae.model, vae.guide, x, **kw) > 1.0


def test_iwae_inside_svi_reports_and_steps_on_the_differentiable_loss(float64: None) -> None:
    vae, x, kw = _subsampled_iwae_case()
    iwae, params = IWAE_ELBO(num_particles=8), list(vae.parameters())
    lr = 1e-3
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), iwae)
    pyro.set_rng_seed(7)
    reference = iwae.differentiable_loss(vae.model, vae.guide, x, **kw)
    grads = torch.autograd.grad(reference, params)
    expected = float(reference.detach())
    pyro.set_rng_seed(7)
    assert math.isclose(svi.evaluate_loss(x, **kw), expected, rel_tol=1e-12)
    before = [p.detach().clone() for p in params]
    pyro.set_rng_seed(7)
    assert math.isclose(svi.step(x, **kw), expected, rel_tol=1e-12)
    # Adam's first step moves each parameter by -lr * g / (|g| + eps) with g these gradients.
    for p, p0, g in zip(params, before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - lr * g / (g.abs() + 1e-8))


def test_iwae_bound_exceeds_elbo_and_rises_toward_log_px(float64: None) -> None:
    vae, x = _tiny_vae(latent_dim=1), _x(n=4)
    log_px = float(_quadrature_log_px(vae, x).mean())
    rows = x.repeat(200, 1)  # independent estimates per image

    def bound(loss: object) -> tuple[float, float]:
        with torch.no_grad():
            values = (
                torch.tensor(
                    [
                        -float(loss.differentiable_loss(vae.model, vae.guide, rows))
                        for _ in range(10)
                    ]
                )
                / rows.shape[0]
            )
        return float(values.mean()), float(values.std() / math.sqrt(len(values)))

    elbo, elbo_se = bound(Trace_ELBO(max_plate_nesting=1))
    means, ses = zip(*(bound(IWAE_ELBO(num_particles=k)) for k in (1, 4, 32)), strict=True)
    assert abs(means[0] - elbo) < 3 * math.hypot(ses[0], elbo_se)  # K = 1 is the ELBO
    assert means[1] > elbo + 3 * math.hypot(ses[1], elbo_se)
    assert means[2] > means[1] + 3 * math.hypot(ses[2], ses[1])
    assert means[2] < log_px + 3 * ses[2]
    assert log_px - means[2] < 0.5 * (log_px - elbo)  # most of the gap is closed at K = 32


def test_make_objective_and_train_config_reject_unknown_names() -> None:
    with pytest.raises(ValueError, match="'renyi'"):
        make_objective("renyi")
    with pytest.raises(ValueError, match="'renyi'"):
        TrainConfig(objective="renyi")
    assert isinstance(make_objective("meanfield", 3), TraceMeanField_ELBO)


# ---------------------------------------------------------------- gradient estimators


def _exact_encoder_gradient(vae: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(-ELBO / B)/d(encoder) with the expectation over z done by quadrature (D = 1)."""
    z = torch.linspace(-15, 15, 8001)
    post = vae.encoder(x)  # Normal(loc (B, 1), scale (B, 1)).to_event(1)
    log_q = post.log_prob(z.reshape(-1, 1, 1))  # (G, B)
    integrand = log_q.exp() * (_grid_log_joint(vae, x, z) - log_q)
    elbo = torch.trapezoid(integrand, z, dim=0).sum() / x.shape[0]
    names, params = zip(*vae.encoder.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(-elbo, params), strict=True))


def test_score_function_and_pathwise_gradients_agree_and_pathwise_has_less_variance(
    float64: None,
) -> None:
    vae, x = _tiny_vae(latent_dim=1), _x(n=3)
    exact = _exact_encoder_gradient(vae, x)
    moments = {
        e: encoder_gradient_moments(vae, x, 40, e, copies=25) for e in ("pathwise", "score")
    }
    for m in moments.values():
        for name, g in exact.items():
            se = (m.variance[name] / m.num_draws).sqrt()
            assert ((m.mean[name] - g).abs() <= 4.5 * se + 1e-9).all(), name
    total = {e: sum(float(v.sum()) for v in m.variance.values()) for e, m in moments.items()}
    assert total["pathwise"] < total["score"]


def test_score_function_handler_turns_off_reparameterization() -> None:
    vae, x = _tiny_vae(latent_dim=2), _x()
    with pyro.plate("particles", 3, dim=-2):
        trace = pyro.poutine.trace(score_function()(vae.guide)).get_trace(x)
    site = trace.nodes["vae.z"]
    assert not site["fn"].has_rsample and not site["value"].requires_grad
    assert site["fn"].batch_shape == (3, 4)


# ---------------------------------------------------------------- command line and script


def _tiny_npz(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 4, generator=g)
    draw = lambda n: torch.bernoulli(probs[torch.arange(n) % 2], generator=g).numpy()  # noqa: E731
    np.savez(path, train=draw(40), valid=draw(32), test=draw(10))  # core pictures need 32
    return path


def _train(tmp_path: Path, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "run"
    argv = ["train", "--data", str(_tiny_npz(tmp_path / "tiny.npz")), "--guide", "full",
            "--latent-dim", "2", "--hidden-dims", "8", "--epochs", "1", "--batch-size", "20",
            "--out", str(out), "--overwrite", "--quiet", *flags]  # fmt: skip
    return main(argv), out


@pytest.mark.parametrize(
    ("flags", "objective", "particles"),
    [
        (("--elbo", "meanfield"), "meanfield", 1),
        (("--objective", "iwae", "--num-particles", "3"), "iwae", 3),
        (("--elbo", "trace"), "elbo", 1),
    ],
)
def test_cli_train_objective_flags(
    tmp_path: Path, flags: tuple[str, ...], objective: str, particles: int
) -> None:
    status, out = _train(tmp_path, *flags)
    assert status == 0
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["objective"], train["num_particles"]) == (objective, particles)
    assert main(["train", "--objective", "renyi"]) == 2


def test_gradient_variance_script_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, run = _train(tmp_path)
    assert status == 0
    script = load_script("gradient_variance")
    capsys.readouterr()
    argv = [str(run), "--num-points", "5", "--num-draws", "4", "--copies", "2"]
    assert script.main([*argv, "--out", str(tmp_path / "g.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(table) >= {"trunk.0.weight", "loc.bias", "tril.weight", "all"}
    pathwise, score = float(table["all"][-3]), float(table["all"][-2])
    assert 0 < pathwise < score  # same draws count, far noisier without reparameterization
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
