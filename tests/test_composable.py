"""The composable model: network pairs by registry, parts that must fit, the conditional VAE
and the data plate a user's program can open."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from robust_helpers import assert_jit_equals_eager

from pyro_vae import VAE, Dataset, TrainConfig, VAEConfig, fit
from pyro_vae.cli import main
from pyro_vae.distributed import ELBOLoss
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.networks import ARCHS, NetworkPair, register_arch
from pyro_vae.train import one_hot_labels

P, D, C = 6, 2, 3


def _binary(*shape: int) -> torch.Tensor:
    return torch.bernoulli(torch.full(shape, 0.5))


def _onehot(labels: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), C).float()


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_network_pair_serves_every_likelihood(arch: str, likelihood: str) -> None:
    """Decoder width = outputs per pixel x P; the model draws, scores and trains."""
    shape = ARCHS[arch].image_shape or (2, 3)
    pixels = shape[0] * shape[1]
    options = LIKELIHOODS[likelihood].options_for_data({}, torch.full((1, pixels), 4.0), None)
    if likelihood == "gaussian":
        options["scale"] = "decoded"  # two outputs per pixel
    config = VAEConfig(
        pixels, D, (8,), "diagonal", image_shape=shape, arch=arch, likelihood=likelihood,
        likelihood_options=options,
    )  # fmt: skip
    vae = VAE(config)
    z, x = vae.model(batch_size=4)
    assert z.shape == (4, D) and x.shape == (4, pixels)
    out = vae.decoder(z)
    assert out.shape == (4, vae.likelihood.outputs_per_pixel * pixels)
    assert vae.decode(z).shape == (4, pixels) and vae.reconstruct(x).shape == (4, pixels)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(x)))


def test_arch_registry_refuses_duplicates_and_unknown_keys() -> None:
    assert {"mlp", "gated", "conv"} <= set(ARCHS)
    with pytest.raises(ValueError, match="already registered"):
        register_arch("mlp")(NetworkPair)
    with pytest.raises(ValueError, match="unknown arch 'cnn'"):
        VAEConfig(P, D, arch="cnn")
    with pytest.raises(ValueError, match="bad options"):
        VAE(VAEConfig(P, D, arch="mlp", arch_options={"depth": 3}))


def test_parts_that_do_not_fit_are_refused_with_both_names() -> None:
    with pytest.raises(ValueError, match="arch 'conv' and image_shape"):
        VAEConfig(P, D, arch="conv")
    with pytest.raises(ValueError, match="arch 'conv' and condition_dim 3 do not fit"):
        VAEConfig(784, D, arch="conv", image_shape=(28, 28), condition_dim=3)
    config = VAEConfig(P, D, likelihood="binomial", likelihood_options={"total_count": 4})
    with pytest.raises(ValueError, match="likelihood 'binomial' and data do not fit"):
        config.check_data(torch.zeros(2, P), pixels="binary")
    with pytest.raises(ValueError, match="needs values in"):
        config.check_data(torch.full((2, P), 5.0), pixels="count")
    config.check_data(torch.full((2, P), 4.0), pixels="count")
    with pytest.raises(ValueError, match="needs values in"):
        VAEConfig(P, D).check_data(torch.full((2, P), 0.5))
    with pytest.raises(ValueError, match="condition_dim must be"):
        VAEConfig(P, D, condition_dim=-1)


def test_a_stored_config_without_the_new_axes_loads_with_their_defaults() -> None:
    old = {  # a config.json written before likelihoods, arch options and conditioning
        "data_dim": P, "latent_dim": D, "hidden_dims": [8], "guide": "diagonal",
        "guide_options": {}, "image_shape": [2, 3], "arch": "mlp", "prior": "standard",
        "prior_options": {}, "latent": "euclidean",
    }  # fmt: skip
    config = VAEConfig.from_dict(old)
    assert (config.likelihood, config.likelihood_options, config.condition_dim) == (
        "bernoulli", {}, 0,
    )  # fmt: skip
    assert VAEConfig.from_dict(config.to_dict()) == config


# ---------------------------------------------------------------- the open data plate


def test_a_program_opens_the_data_plate_and_puts_its_own_sites_in_it() -> None:
    vae, x = VAE(VAEConfig(P, D, (8,), "diagonal")), _binary(4, P)

    def program(x: torch.Tensor) -> None:
        with vae.plate(x, num_data=40):
            pyro.sample("user.w", dist.Normal(0.0, 1.0))
            vae.model(x)

    trace = poutine.trace(program).get_trace(x)
    plates = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    assert plates.count("vae.data") == 1  # one plate, entered once
    for name in ("user.w", "vae.z", "vae.x"):
        site = trace.nodes[name]
        assert [f.name for f in site["cond_indep_stack"]] == ["vae.data"]
        assert site["scale"] == 10.0  # N / B from the shared plate
    assert trace.nodes["user.w"]["value"].shape == (4,)
    with pytest.raises(ValueError, match="the open plate 'vae.data' holds 4 images, x has 2"):
        with vae.plate(x):
            vae.model(x[:2])


def test_without_the_open_plate_the_same_names_clash() -> None:
    """What the open plate is for: two plates of one name in one program are refused."""
    x = _binary(4, P)

    def program(x: torch.Tensor) -> None:
        with pyro.plate("vae.data", 4, dim=-1):
            pyro.sample("user.w", dist.Normal(0.0, 1.0))
        with pyro.plate("vae.data", 4, dim=-1):
            pyro.sample("user.v", dist.Normal(0.0, 1.0))

    with pytest.raises(RuntimeError, match="Multiple sample sites named 'vae.data'"):
        poutine.trace(program).get_trace(x)


# ---------------------------------------------------------------- the conditional VAE


def _conditional() -> VAE:
    return VAE(VAEConfig(P, D, (8,), "diagonal", condition_dim=C)).double()


def test_conditional_elbo_terms_equal_a_hand_computation() -> None:
    """log p(x|z,c) + log p(z) - log q(z|x,c) with [z, c] and [x, c] joined by hand."""
    vae, x = _conditional(), _binary(4, P).double()
    c = _onehot([0, 2, 1, 2]).double()
    guide = poutine.trace(vae.guide).get_trace(x, condition=c)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, condition=c)
    z = guide.nodes["vae.z"]["value"]
    log_lik = dist.Bernoulli(logits=vae.decoder(torch.cat([z, c], -1))).log_prob(x).sum(-1)
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = vae.encoder(torch.cat([x, c], -1)).log_prob(z)
    got = model.log_prob_sum() - guide.log_prob_sum()
    assert torch.allclose(got, (log_lik + log_prior - log_q).sum(), atol=1e-10)
    # the condition reaches both networks
    other = _onehot([1, 0, 0, 1]).double()
    assert not torch.allclose(vae.decode(z, c), vae.decode(z, other))
    assert not torch.allclose(vae.reconstruct(x, c), vae.reconstruct(x, other))


def test_an_enumerated_condition_broadcasts_over_the_batch() -> None:
    """A label site enumerated in parallel, y of shape (C, 1): x scores as (C, B)."""
    vae, x = _conditional(), _binary(5, P).double()
    labels = torch.arange(C)[:, None]  # (C, 1), as parallel enumeration gives
    trace = poutine.trace(vae.model).get_trace(
        x, condition=torch.nn.functional.one_hot(labels, C).double()
    )
    trace.compute_log_prob()
    assert trace.nodes["vae.x"]["log_prob"].shape == (C, 5)


def test_condition_errors_are_one_line() -> None:
    vae, x = _conditional(), _binary(4, P).double()
    with pytest.raises(ValueError, match="this VAE is conditional"):
        vae.model(x)
    with pytest.raises(ValueError, match="condition must have shape"):
        vae.guide(x, condition=torch.zeros(4, C + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="condition must have shape"):
        VAE(VAEConfig(P, D, (8,), "diagonal")).model(x.float(), condition=torch.zeros(4, C))


# ---------------------------------------------------------------- conditional training


def _labeled_data(n: int = 60) -> Dataset:
    torch.manual_seed(0)
    labels = torch.arange(n) % C
    prototypes = _binary(C, P)
    x = torch.where(torch.rand(n, P) < 0.9, prototypes[labels], 1 - prototypes[labels])
    return Dataset(
        x[:40], x[40:50], x[50:], (2, 3), train_labels=labels[:40], valid_labels=labels[40:50],
        test_labels=labels[50:],
    )  # fmt: skip


def _fit_conditional(data: Dataset, width: int = C) -> VAE:
    torch.manual_seed(3)
    vae = VAE(VAEConfig(P, D, (8,), "diagonal", condition_dim=width))
    fit(vae, data, TrainConfig(num_epochs=2, batch_size=10, seed=3), progress=False)
    return vae


def test_fit_trains_on_the_one_hot_labels() -> None:
    data = _labeled_data()
    c = one_hot_labels(VAE(VAEConfig(P, D, (8,), "diagonal", condition_dim=C)), data, "valid")
    assert c.shape == (10, C) and torch.equal(c.argmax(-1), data.valid_labels)
    first, again = _fit_conditional(data), _fit_conditional(data)
    shuffled = _fit_conditional(replace(data, train_labels=data.train_labels.roll(1)))
    params = list(first.parameters())
    same = [torch.equal(a, b) for a, b in zip(params, again.parameters(), strict=True)]
    moved = [torch.equal(a, b) for a, b in zip(params, shuffled.parameters(), strict=True)]
    assert all(same) and not all(moved)  # the labels, and only they, steer the training
    loss = ELBOLoss(first, Trace_ELBO(max_plate_nesting=1))
    x, cond = data.train[:10], one_hot_labels(first, data, "train")[:10]
    pyro.set_rng_seed(5)
    got = loss(x, 40, None, cond)
    pyro.set_rng_seed(5)
    want = Trace_ELBO().differentiable_loss(
        first.model, first.guide, x, num_data=40, condition=cond
    )
    assert torch.allclose(got, want)


def test_fit_refuses_a_conditional_vae_it_cannot_feed() -> None:
    data, config = _labeled_data(), TrainConfig(num_epochs=1, batch_size=10)
    vae = VAE(VAEConfig(P, D, (8,), "diagonal", condition_dim=C))
    with pytest.raises(ValueError, match="valid split has none"):
        fit(vae, replace(data, valid_labels=None), config)
    with pytest.raises(ValueError, match="3 classes but condition_dim is 2"):
        fit(VAE(VAEConfig(P, D, (8,), "diagonal", condition_dim=2)), data, config)


def test_the_compiled_loss_of_a_conditional_vae_equals_the_eager_one(float64: None) -> None:
    vae = VAE(VAEConfig(P, D, (8,), "diagonal", condition_dim=C))
    x = torch.bernoulli(torch.full((7, P), 0.5))
    condition = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 1, 0, 2, 2]), C).double()
    assert_jit_equals_eager(vae, x, betas=(1.0, 0.5), condition=condition)


def test_the_cli_trains_evaluates_and_draws_a_conditional_vae(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "cvae"
    small = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "16", "--quiet"]
    assert main(["train", "--conditional", *small, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["condition_dim"] == 10  # the digits' classes
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "5", "--json", "--quiet"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["log_likelihood"])
    assert main(["sample", str(run), "-n", "20", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["gaps", str(run), "--quiet"]) == 2
    assert "gaps takes an unconditional VAE" in capsys.readouterr().err
    array = tmp_path / "x.npy"
    np.save(array, np.random.default_rng(0).integers(0, 2, (30, 4)).astype(np.float32))
    assert main(["train", "--conditional", "--data", str(array), *small, "--batch-size", "5",
                 "--out", str(tmp_path / "none")]) == 2  # fmt: skip
    assert "--conditional needs labels" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hidden_dims": (10**12,)}, "hidden_dims [1000000000000]"),
        ({"prior": "mixture", "prior_options": {"num_components": 10**11}}, "num_components"),
        ({"guide": "iaf", "guide_options": {"num_flows": 10**8}}, "num_flows 100000000"),
        ({"latent_dims": (1000, 1000, 1000), "hidden_dims": (10**6,)}, "latent_dims"),
    ],
)
def test_sizes_beyond_the_machine_are_refused_before_allocating(
    changes: dict, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyro_vae.validation as validation

    pattern = rf"{re.escape(named)}.*would need about .* GiB, more than"
    with pytest.raises(ValueError, match=pattern):
        VAEConfig(784, **{"guide": "diagonal", **changes})
    monkeypatch.setattr(validation, "physical_memory", lambda: 2**60)  # a machine big enough
    assert VAEConfig(784, **{"guide": "diagonal", **changes}).estimated_parameters() > 10**9


def test_the_size_estimate_is_close_to_the_real_count() -> None:
    for config in (
        VAEConfig(784, 50, (400, 400), "diagonal"),
        VAEConfig(784, hidden_dims=(300,), guide="diagonal", latent_dims=(40, 20)),
        VAEConfig(784, 40, (300, 300), "iaf", {"num_flows": 4}, arch="gated"),
    ):
        real = sum(p.numel() for p in VAE(config).parameters())
        assert 0.5 * real <= config.estimated_parameters() <= 2.5 * real


def test_steps_and_sample_grids_beyond_the_machine_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, vae = _labeled_data(), VAE(VAEConfig(P, D, (8,), "diagonal"))
    data = replace(data, train_labels=None, valid_labels=None, test_labels=None)
    with pytest.raises(ValueError, match="num_particles 10000000000 x batch_size 10 would need"):
        fit(vae, data, TrainConfig(num_epochs=1, batch_size=10, num_particles=10**10))
    run = tmp_path / "run"
    small = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "8", "--quiet"]
    assert main(["train", *small, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "-n", str(10**11)]) == 2
    assert "-n 100000000000 images would need about" in capsys.readouterr().err
