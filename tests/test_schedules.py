"""Training recipes: KL warm-up against a hand-computed loss, lr schedules, early stopping."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from robust_helpers import assert_jit_equals_eager, tiny_config, tiny_data, tiny_vae

import pyro_vae.train as train_module
from pyro_vae import VAE, TrainConfig, VAEConfig, fit
from pyro_vae.distributed import ELBOLoss, Replica
from pyro_vae.evaluate import log_weights
from pyro_vae.objectives import make_objective, scale_latent
from pyro_vae.runs import summarize_run
from pyro_vae.schedules import kl_weight, learning_rate, patience_exhausted
from pyro_vae.train import compiles_loss

# ---------------------------------------------------------------- KL warm-up


def _loss_and_grads(loss: torch.nn.Module, x: torch.Tensor, num_data: int, seed: int) -> tuple:
    pyro.set_rng_seed(seed)
    value = loss(x, num_data)
    params = list(loss.vae.parameters())
    return value.detach(), torch.autograd.grad(value, params, allow_unused=True)


def _by_hand(vae: VAE, x: torch.Tensor, num_data: int, beta: float, seed: int, analytic: bool):
    """-(N/B) sum_b [log p(x|z) - beta (log q(z|x) - log p(z))] from the same noise."""
    pyro.set_rng_seed(seed)
    post = vae.encoder(x)
    z = post.rsample()  # the draw the Pyro guide makes first with this seed
    log_lik = torch.distributions.Bernoulli(logits=vae.decoder(z)).log_prob(x).sum(-1)
    prior = torch.distributions.Independent(
        torch.distributions.Normal(vae.prior_loc, vae.prior_scale), 1
    )
    if analytic:
        kl = torch.distributions.kl_divergence(post, prior.expand(post.batch_shape))
    else:
        kl = post.log_prob(z) - prior.log_prob(z)
    value = -(num_data / x.shape[0]) * (log_lik - beta * kl).sum()
    params = list(vae.parameters())
    return value.detach(), torch.autograd.grad(value, params, allow_unused=True)


@pytest.mark.parametrize("objective", ["elbo", "meanfield"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_weighted_loss_matches_hand_computation(
    float64: None, beta: float, objective: str
) -> None:
    vae = VAE(VAEConfig(6, 2, (5,), "diagonal"))
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    loss = ELBOLoss(vae, make_objective(objective))
    loss.beta = beta
    value, grads = _loss_and_grads(loss, x, num_data=20, seed=7)
    expected, expected_grads = _by_hand(vae, x, 20, beta, seed=7, analytic=objective != "elbo")
    assert value == pytest.approx(float(expected), rel=1e-10, abs=1e-10)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
    if beta != 1.0:  # the weight changes the loss: the comparison above can tell them apart
        unweighted, _ = _by_hand(vae, x, 20, 1.0, seed=7, analytic=objective != "elbo")
        assert abs(float(unweighted - expected)) > 1e-3


def test_scale_latent_leaves_other_sites_and_refuses_bad_weights() -> None:
    vae = VAE(VAEConfig(6, 2, (5,), "diagonal"))
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    with scale_latent("vae.z", 0.25):
        trace = poutine.trace(vae.model).get_trace(x, num_data=12)
    assert trace.nodes["vae.z"]["scale"] == pytest.approx(0.25 * 4)
    assert trace.nodes["vae.x"]["scale"] == pytest.approx(4.0)
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="beta"):
            scale_latent("vae.z", bad)  # type: ignore[arg-type]


def test_compiled_loss_takes_the_kl_weight_as_an_input(float64: None) -> None:
    vae = VAE(VAEConfig(6, 2, (5,), "diagonal"))
    assert_jit_equals_eager(vae, torch.bernoulli(torch.full((4, 6), 0.5)), betas=(0.0, 0.5, 1.0))
    assert compiles_loss(TrainConfig(kl_warmup=3))  # the default compiles a warm-up too


def test_kl_weight_is_linear_over_the_warmup() -> None:
    weights = [kl_weight(epoch, 4) for epoch in range(1, 9)]
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    steps = [b - a for a, b in zip(weights[:5], weights[1:5], strict=False)]
    assert all(step == pytest.approx(0.25) for step in steps)
    assert [kl_weight(epoch, 0) for epoch in (1, 2, 50)] == [1.0, 1.0, 1.0]
    assert [kl_weight(epoch, 1) for epoch in (1, 2, 3)] == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------- learning rate


def _torch_schedule(scheduler_cls: type, num_epochs: int, **kwargs: float) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=1e-2)
    scheduler = scheduler_cls(optimizer, **kwargs)
    lrs = []
    for _ in range(num_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_schedules_match_torch_schedulers_stepped_per_epoch() -> None:
    e = 9
    cosine = _torch_schedule(torch.optim.lr_scheduler.CosineAnnealingLR, e, T_max=e, eta_min=1e-4)
    ours = [learning_rate(k, 1e-2, "cosine", e, lr_min=1e-4) for k in range(1, e + 1)]
    assert ours == pytest.approx(cosine, rel=1e-9)
    exponential = _torch_schedule(torch.optim.lr_scheduler.ExponentialLR, e, gamma=0.7)
    ours = [learning_rate(k, 1e-2, "exponential", e, gamma=0.7) for k in range(1, e + 1)]
    assert ours == pytest.approx(exponential, rel=1e-9)
    floored = [learning_rate(k, 1e-2, "exponential", e, 0.5, 1e-3) for k in range(1, 6)]
    assert floored == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3, 1e-3])
    assert {learning_rate(k, 3e-4, "constant", e, 0.5, 1e-5) for k in range(1, e + 1)} == {3e-4}


def test_fit_applies_the_weight_and_rate_of_each_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 steps per epoch; the loss sees the epoch's beta, Adam its lr; valid ELBO unweighted."""
    seen, valid_scales = [], []
    step, valid = train_module._step, train_module._validate

    def spy_step(loss_fn: ELBOLoss, optimizer: torch.optim.Optimizer, *args: object) -> object:
        seen.append((loss_fn.beta, optimizer.param_groups[0]["lr"]))
        return step(loss_fn, optimizer, *args)

    def spy_valid(vae: VAE, x: torch.Tensor, *args: object) -> dict[str, float]:
        site = poutine.trace(vae.model).get_trace(x)
        valid_scales.append(site.nodes["vae.z"]["scale"])
        return valid(vae, x, *args)

    monkeypatch.setattr(train_module, "_step", spy_step)
    monkeypatch.setattr(train_module, "_validate", spy_valid)
    config = tiny_config(
        5, kl_warmup=2, lr_schedule="exponential", lr_gamma=0.5, lr_min=1e-4, lr=1e-3
    )
    history = fit(tiny_vae(), tiny_data(), config, progress=False)
    betas, lrs = [0.0, 0.5, 1.0, 1.0, 1.0], [1e-3, 5e-4, 2.5e-4, 1.25e-4, 1e-4]
    expected = [(b, pytest.approx(lr)) for b, lr in zip(betas, lrs, strict=True)]
    assert seen == [pair for pair in expected for _ in range(3)]
    assert [row["kl_weight"] for row in history] == betas
    assert [row["lr"] for row in history] == pytest.approx(lrs)
    assert valid_scales == [1.0] * 5


def test_default_config_keeps_the_old_metrics_columns() -> None:
    history = fit(tiny_vae(), tiny_data(), tiny_config(1), progress=False)
    assert list(history[0]) == ["epoch", "train_elbo", "valid_elbo", "seconds"]


# ---------------------------------------------------------------- early stopping


def _scripted_valid(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    calls = iter(values)
    monkeypatch.setattr(train_module, "_validate", lambda *args: {"valid_elbo": next(calls)})


def test_patience_stops_after_that_many_epochs_without_improvement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [-5.0, -4.0, -4.5, -4.2, -4.1, -3.0, -2.0, -1.0]  # best at epoch 2, then 6..8
    _scripted_valid(monkeypatch, values)
    history = fit(tiny_vae(), tiny_data(), tiny_config(8, patience=3), tmp_path, progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    _scripted_valid(monkeypatch, values)
    longer = fit(tiny_vae(), tiny_data(), tiny_config(8, patience=4), progress=False)
    assert len(longer) == 8
    _scripted_valid(monkeypatch, [])  # a resumed, stopped run trains no further epoch
    resumed = fit(tiny_vae(), tiny_data(), tiny_config(8, patience=3), tmp_path, False, True)
    assert [row["valid_elbo"] for row in resumed] == values[:5]
    assert not patience_exhausted(7, 5, None) and patience_exhausted(8, 5, 3)


def test_patience_counts_only_after_the_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_valid(monkeypatch, [-1.0] + [-2.0] * 7)  # best at epoch 1, never again
    config = tiny_config(8, patience=2, kl_warmup=4)
    assert [row["epoch"] for row in fit(tiny_vae(), tiny_data(), config, progress=False)] == [
        1, 2, 3, 4, 5, 6
    ]  # fmt: skip
    assert not patience_exhausted(5, 1, 2, 4) and patience_exhausted(6, 1, 2, 4)


def test_an_iwae_run_keeps_and_stops_by_its_validation_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trained with the IWAE bound, a run picks its checkpoint and counts patience by the
    validation bound (``valid_bound``), not by the ELBO, which may fall meanwhile."""
    elbos = [-5.0, -5.5, -6.0, -6.5, -7.0, -7.5]
    bounds = [-4.0, -3.5, -3.6, -3.7, -3.0, -3.1]  # best at epoch 2, then 5
    calls = iter(zip(elbos, bounds, strict=True))
    monkeypatch.setattr(
        train_module,
        "_validate",
        lambda *args: dict(zip(("valid_elbo", "valid_bound"), next(calls), strict=True)),
    )
    config = tiny_config(6, objective="iwae", num_particles=2, patience=3)
    history = fit(tiny_vae(), tiny_data(), config, tmp_path, progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]  # epoch 5 reset patience
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["epoch"] == 5
    assert (payload["valid_elbo"], payload["valid_bound"]) == (-7.0, -3.0)
    (tmp_path / "config.json").write_text("{}")  # what the CLI adds beside fit's files
    summary = summarize_run(tmp_path)
    assert summary["best_epoch"] == 5 and summary["best_valid_elbo"] == -7.0
    calls = iter(zip(elbos, [-4.0, -3.5, -3.6, -3.7, -3.8, -3.0], strict=True))
    stopped = fit(tiny_vae(), tiny_data(), config, progress=False)
    assert [row["epoch"] for row in stopped] == [1, 2, 3, 4, 5]  # 3 epochs without a better bound


@pytest.mark.parametrize("num_particles", [1, 4])
def test_validation_bound_is_the_log_mean_weight_of_the_elbos_draws(num_particles: int) -> None:
    """From the same K draws per image: the bound is log (1/K) sum_k w_k, the ELBO the mean
    of log w_k; equal for K = 1, the bound above the ELBO (Jensen) for K > 1."""
    vae, data = tiny_vae(), tiny_data()
    valid = data.valid[:12]
    pyro.set_rng_seed(7)
    scores = train_module._validate(vae, valid, 5, Replica(), num_particles=num_particles)
    pyro.set_rng_seed(7)
    log_w = []
    vae.eval()
    with torch.no_grad():
        for start in range(0, 12, 5):
            w = log_weights(vae, valid[start : start + 5], num_particles)
            log_w.append(w["log_lik"] + w["log_prior"] - w["log_q"])  # (K, B)
    log_w = torch.cat(log_w, dim=1)
    elbo = float(log_w.mean())
    bound = float((torch.logsumexp(log_w, 0) - math.log(num_particles)).mean())
    assert scores["valid_elbo"] == pytest.approx(elbo, rel=1e-6)
    assert scores["valid_bound"] == pytest.approx(bound, rel=1e-6)
    if num_particles == 1:
        assert scores["valid_bound"] == pytest.approx(scores["valid_elbo"], rel=1e-6)
    else:
        assert scores["valid_bound"] > scores["valid_elbo"] + 1e-3


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"kl_warmup": -1}, "kl_warmup"),
        ({"kl_warmup": True}, "kl_warmup"),
        ({"kl_warmup": 2.5}, "kl_warmup"),
        ({"kl_warmup": 2, "objective": "iwae"}, "kl_warmup needs"),
        ({"lr_schedule": "step"}, "lr_schedule 'step'"),
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"lr_gamma": 1.5}, "lr_gamma"),
        ({"lr_gamma": math.nan}, "lr_gamma"),
        ({"lr_min": -1e-5}, "lr_min"),
        ({"lr_min": 0.1, "lr": 0.01}, "lr_min"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.0}, "patience"),
    ],
)
def test_bad_recipe_settings_are_refused(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**bad)


def test_old_train_configs_mean_no_recipe() -> None:
    old = {"num_epochs": 3, "batch_size": 16, "lr": 1e-3, "num_particles": 1, "seed": 0}
    old.update(log_every=10, clip_norm=None, objective="elbo", jit=False)
    config = TrainConfig(**old)
    assert (config.kl_warmup, config.lr_schedule, config.patience) == (0, "constant", None)
    assert {learning_rate(e, config.lr, config.lr_schedule, 3) for e in (1, 2, 3)} == {1e-3}
    assert isinstance(train_module.make_loss(config), Trace_ELBO)


@pytest.mark.parametrize("latent_dims", [(2,), (2, 2)])
def test_validation_after_a_fused_optimizer_step_scores_the_stepped_vamp_prior(
    latent_dims: tuple[int, ...],
) -> None:
    """The trainer's fused Adam steps parameters without advancing their version counters:
    a validation after a step must score the stepped VampPrior, as a fresh copy does."""
    pyro.set_rng_seed(0)
    config = VAEConfig(
        12, 2, (8,), "diagonal", latent_dims=latent_dims,
        prior="vamp", prior_options={"num_components": 3},
    )  # fmt: skip
    vae, valid = VAE(config), tiny_data().valid
    train_module._validate(vae, valid, 5, Replica())  # an earlier validation
    optimizer = train_module.make_optimizer(vae.parameters(), 0.1, torch.device("cpu"))
    for p in vae.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    copy = VAE(config)
    copy.load_state_dict(vae.state_dict())
    scores = []
    for model in (vae, copy):
        pyro.set_rng_seed(3)
        scores.append(train_module._validate(model, valid, 5, Replica())["valid_elbo"])
    assert scores[0] == scores[1]
