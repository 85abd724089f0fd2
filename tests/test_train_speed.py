"""The fast training path: the ELBO module, vectorized particles, JIT, fused Adam, CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from robust_helpers import assert_jit_equals_eager

from pyro_vae import GUIDES, VAE, VAEConfig
from pyro_vae.cli import main
from pyro_vae.data import Dataset
from pyro_vae.distributed import ELBOLoss
from pyro_vae.evaluate import log_likelihood
from pyro_vae.train import TrainConfig, compiles_loss, fit, make_optimizer

#: guides known to compile under torch.jit.trace
JIT_GUIDES = ("diagonal", "full", "lowrank", "iaf", "planar", "radial")


def _tiny_vae(key: str, data_dim: int = 5, latent_dim: int = 2) -> VAE:
    return VAE(VAEConfig(data_dim, latent_dim, (4,), key))


@pytest.mark.parametrize("key", sorted(GUIDES))
def test_particle_average_matches_single_particle_losses_in_expectation(key: str) -> None:
    """K vectorized particles: same mean as one particle, K times smaller variance."""
    vae = _tiny_vae(key)
    x = torch.bernoulli(torch.full((3, 5), 0.5))
    single = ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    multi = ELBOLoss(vae, elbo)
    multi(x, 30).backward()  # K > 1 trains
    assert all(p.grad is not None and p.grad.isfinite().all() for p in vae.parameters())
    with torch.no_grad(), pyro.validation_enabled(False):
        ones = torch.stack([single(x, 30) for _ in range(200)])
        fours = torch.stack([multi(x, 30) for _ in range(50)])
    standard_error = (ones.var() / 200 + fours.var() / 50).sqrt()
    assert (ones.mean() - fours.mean()).abs() < 4 * standard_error
    assert 1.5 < float(ones.var() / fours.var()) < 10.0  # independent draws, averaged not summed


@pytest.mark.parametrize("key", JIT_GUIDES)
def test_jit_changes_no_result_beyond_float_tolerance(float64: None, key: str) -> None:
    vae = _tiny_vae(key)
    x = torch.bernoulli(torch.full((7, 5), 0.5))
    assert_jit_equals_eager(vae, x)
    # a KL warm-up's weights and a rank's subsample are inputs of the one compiled graph
    subsample = torch.tensor([9, 2, 40, 7, 0, 1, 3])
    assert_jit_equals_eager(vae, x, betas=(0.3, 0.0), subsample=subsample)


@pytest.mark.parametrize("key", ["diagonal", "full", "iaf", "vamp-prior"])
def test_training_loss_without_param_statements_is_the_same_loss(float64: None, key: str) -> None:
    """ELBOLoss skips pyro.param statements; value and gradients stay Trace_ELBO's own."""
    prior = "vamp" if key == "vamp-prior" else "standard"
    vae = VAE(VAEConfig(5, 2, (4,), "diagonal" if prior == "vamp" else key, prior=prior))
    x = torch.bernoulli(torch.full((6, 5), 0.5))
    params = list(vae.parameters())
    torch.manual_seed(2)
    with pyro.poutine.trace(param_only=True) as tracer:
        loss = ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))(x, 30)
    grads = torch.autograd.grad(loss, params)
    assert not [n for n in tracer.trace.nodes.values() if n["type"] == "param"]
    torch.manual_seed(2)  # the same draws through Pyro's usual route, params registered
    with pyro.poutine.trace(param_only=True) as tracer:
        expected = Trace_ELBO(max_plate_nesting=1).differentiable_loss(
            vae.model, vae.guide, x, num_data=30
        )
    names = {n["name"] for n in tracer.trace.nodes.values() if n["type"] == "param"}
    assert len(names) == len(params)  # every parameter goes through a statement there
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    for a, b in zip(grads, torch.autograd.grad(expected, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert vae._param_statements  # switched back on


@pytest.mark.parametrize("validate", [False, True])
def test_fit_runs_pyro_validation_as_configured_and_restores_it(validate: bool) -> None:
    from pyro.infer.util import is_validation_enabled

    vae = _tiny_vae("diagonal")
    seen: list[bool] = []
    vae.decoder.register_forward_hook(lambda *_: seen.append(is_validation_enabled()))
    data = Dataset(torch.bernoulli(torch.full((8, 5), 0.5)), torch.ones(2, 5), None, (1, 5))
    before = is_validation_enabled()
    fit(vae, data, TrainConfig(num_epochs=1, batch_size=4, validate=validate), progress=False)
    assert seen and set(seen) == {validate}
    assert is_validation_enabled() == before


def test_jit_trains_its_own_module_not_an_earlier_one_of_the_same_name() -> None:
    first = _tiny_vae("diagonal")
    x = torch.bernoulli(torch.full((6, 5), 0.5))
    ELBOLoss(first, Trace_ELBO(max_plate_nesting=1))(x)  # registers "vae.*" in the param store
    second = _tiny_vae("diagonal")
    before = [p.detach().clone() for p in second.parameters()]
    data = Dataset(x, x[:2], None, (1, 5))
    fit(second, data, TrainConfig(num_epochs=2, batch_size=3, jit=True), progress=False)
    assert all(not torch.equal(a, b) for a, b in zip(before, second.parameters(), strict=True))


@pytest.mark.parametrize("key", sorted(GUIDES))
def test_fit_with_particles_for_every_guide(key: str) -> None:
    vae = _tiny_vae(key)
    x = torch.bernoulli(torch.full((12, 5), 0.5))
    data = Dataset(x, x[:4], None, (1, 5))
    history = fit(vae, data, TrainConfig(num_epochs=2, batch_size=5, num_particles=3), None, False)
    assert len(history) == 2
    assert all(row["train_elbo"] < 0 and row["valid_elbo"] < 0 for row in history)


def test_fused_adam_takes_the_same_steps_as_the_reference_adam() -> None:
    torch.manual_seed(0)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    fast = make_optimizer(params, 1e-2, torch.device("cpu"))
    slow = torch.optim.Adam(twins, lr=1e-2, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads, strict=True):
            p.grad, t.grad = g.clone(), g.clone()
        fast.step()
        slow.step()
    for p, t in zip(params, twins, strict=True):
        assert torch.allclose(p, t, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))


def test_bad_jit_flag_is_refused() -> None:
    with pytest.raises(TypeError, match="'yes'"):
        TrainConfig(jit="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", sorted(GUIDES))
def test_cuda_training_and_evaluation(key: str) -> None:
    device = torch.device("cuda")
    vae = _tiny_vae(key, data_dim=16, latent_dim=3).to(device)
    x = torch.bernoulli(torch.full((40, 16), 0.3))
    data = Dataset(x, x[:10], None, (4, 4))  # on the CPU: fit moves it once
    history = fit(vae, data, TrainConfig(num_epochs=2, batch_size=8, num_particles=2), None, False)
    assert all(p.device.type == "cuda" for p in vae.parameters())
    assert history[-1]["valid_elbo"] < 0
    log_px = log_likelihood(vae, x[:10].to(device), num_samples=200)
    assert log_px.device.type == "cuda" and log_px.isfinite().all()
    cpu_log_px = log_likelihood(vae.cpu(), x[:10], num_samples=200)
    assert torch.allclose(log_px.cpu(), cpu_log_px, atol=0.5)  # two IS estimates of one value


def test_cli_jit_and_particles(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 2, size=(400, 16)).astype(np.float32)
    np.save(tmp_path / "tiny.npy", images)
    argv = ["train", "--data", str(tmp_path / "tiny.npy"), "--guide", "full", "--jit"]
    argv += ["--num-particles", "2", "--latent-dim", "2", "--hidden-dims", "8", "--epochs", "1"]
    argv += ["--batch-size", "64", "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["jit"] is True and saved["num_particles"] == 2


def test_the_default_compiles_wherever_it_applies() -> None:
    vae, sphere = _tiny_vae("diagonal"), VAE(VAEConfig(5, 5, (4,), "vmf", latent="sphere"))
    assert vae.traceable and not sphere.traceable  # vMF's rejection loop cannot be traced
    assert compiles_loss(TrainConfig(), vae) and compiles_loss(TrainConfig(kl_warmup=2), vae)
    assert compiles_loss(TrainConfig(gradient_estimator="stl"), vae)
    eager = [
        TrainConfig(jit=False),
        TrainConfig(objective="meanfield"),
        TrainConfig(objective="meanfield", gradient_estimator="stl"),
        TrainConfig(objective="iwae", num_particles=2),
        TrainConfig(objective="iwae", num_particles=2, gradient_estimator="dreg"),
        TrainConfig(free_bits=0.5),
        TrainConfig(validate=True),  # Pyro's checks run on every step
    ]
    assert not any(compiles_loss(config, vae) for config in eager)
    assert not compiles_loss(TrainConfig(), sphere) and compiles_loss(TrainConfig(jit=True))
    data = Dataset(torch.bernoulli(torch.full((8, 5), 0.5)), torch.ones(4, 5), None, (1, 5))
    fit(sphere, data, TrainConfig(num_epochs=1, batch_size=4), progress=False)  # eager
    with pytest.raises(ValueError, match="compile this VAE: VonMisesFisherGuide is not"):
        fit(sphere, data, TrainConfig(num_epochs=1, batch_size=4, jit=True), progress=False)


def _tiny_train_argv(tmp_path: Path) -> list[str]:
    """``pyro-vae train`` of one quick epoch on 40 random binary images (no --out)."""
    np.save(tmp_path / "tiny.npy", (np.random.default_rng(0).random((40, 5)) < 0.5).astype(float))
    base = ["train", "--data", str(tmp_path / "tiny.npy"), "--guide", "diagonal", "--epochs", "1"]
    return [*base, "--batch-size", "8", "--latent-dim", "2", "--hidden-dims", "4", "--quiet"]


def test_the_start_line_says_whether_the_loss_is_compiled(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = _tiny_train_argv(tmp_path)
    for extra, words in (([], "compiled loss"), (["--no-jit"], "eager loss")):
        assert main([*base, *extra, "--out", str(tmp_path / words.split()[0])]) == 0
        assert f"on cpu, {words}" in capsys.readouterr().err.splitlines()[0]


def test_the_start_line_names_the_objective_and_estimator(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = _tiny_train_argv(tmp_path)
    cases = (
        (
            ["--objective", "iwae", "--num-particles", "3", "--gradient-estimator", "dreg"],
            ", IWAE bound with K = 3, DReG gradient",
        ),
        (
            ["--num-particles", "2", "--gradient-estimator", "stl"],
            ", ELBO with 2 draws, STL gradient",
        ),
        (["--objective", "meanfield"], ", mean-field ELBO"),
        (["--free-bits", "0.5"], ", free bits 0.5 nats per layer"),
    )
    for number, (extra, words) in enumerate(cases):
        assert main([*base, *extra, "--out", str(tmp_path / str(number))]) == 0
        line = capsys.readouterr().err.splitlines()[0]
        assert line.endswith(words), line
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().err.splitlines()[0].endswith("compiled loss")
