"""The VAE's Pyro program: sites, plates, subsampling scale, and the ELBO by hand."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, VAEConfig


def _vae(guide: str = "full", latent_dim: int = 3, name: str = "vae") -> VAE:
    return VAE(VAEConfig(data_dim=6, latent_dim=latent_dim, hidden_dims=(8,), guide=guide), name)


def _x(n: int = 4) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 6), 0.5))


def test_traced_sites_and_shapes() -> None:
    vae, x = _vae(), _x()
    model = poutine.trace(vae.model).get_trace(x)
    guide = poutine.trace(vae.guide).get_trace(x)
    z, obs = model.nodes["vae.z"], model.nodes["vae.x"]
    assert z["value"].shape == (4, 3) and z["fn"].event_shape == (3,)
    assert obs["is_observed"] and torch.equal(obs["value"], x) and obs["fn"].event_shape == (6,)
    assert [f.name for f in z["cond_indep_stack"]] == ["vae.data"]
    assert guide.nodes["vae.z"]["value"].shape == (4, 3)
    assert not guide.nodes["vae.z"]["is_observed"]


def test_model_generates_without_data() -> None:
    z, x = _vae().model(batch_size=5)
    assert x.shape == (5, 6) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert z.shape == (5, 3)


def test_plate_sized_to_dataset_scales_log_density_by_n_over_b() -> None:
    vae, x = _vae(), _x()
    guide = poutine.trace(vae.guide).get_trace(x, num_data=100)
    replayed = poutine.replay(vae.model, trace=guide)
    full = poutine.trace(replayed).get_trace(x, num_data=100)
    batch = poutine.trace(replayed).get_trace(x)
    assert full.nodes["vae.z"]["scale"] == pytest.approx(25.0)
    assert full.log_prob_sum().item() == pytest.approx(25 * batch.log_prob_sum().item(), rel=1e-5)


def test_num_data_smaller_than_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_data"):
        _vae().model(_x(4), num_data=3)


@pytest.mark.parametrize("guide", ["diagonal", "full"])
def test_single_sample_elbo_equals_hand_computation(guide: str, float64: None) -> None:
    """For a fixed eps: ELBO = log p(x|z) + log p(z) - log q(z|x), with Algorithm 2's log q."""
    vae, x = _vae(guide), _x()
    if guide == "full":
        torch.nn.init.normal_(vae.encoder.tril.weight)
        loc, factor = vae.encoder.scale_tril(x)
        scale = torch.diagonal(factor, dim1=-2, dim2=-1)
    else:
        loc, scale, _ = vae.encoder.loc_scale(x)
        factor = torch.diag_embed(scale)
    eps = torch.randn(4, 3)
    z = loc + (factor @ eps.unsqueeze(-1)).squeeze(-1)
    logits = vae.decoder(z)
    log_lik = (x * logits - F.softplus(logits)).sum(-1)
    log_prior = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
    log_q = -((eps**2 + math.log(2 * math.pi)) / 2 + scale.log()).sum(-1)
    by_hand = (log_lik + log_prior - log_q).sum()

    fixed = poutine.trace(poutine.condition(vae.guide, data={"vae.z": z})).get_trace(x)
    fixed.nodes["vae.z"]["is_observed"] = False  # a draw of the guide, with our eps
    loss = Trace_ELBO().loss(
        poutine.replay(vae.model, trace=fixed), poutine.replay(vae.guide, trace=fixed), x
    )
    assert -loss == pytest.approx(by_hand.item(), abs=1e-8)


def test_one_step_of_pyros_own_svi_updates_every_parameter() -> None:
    vae, x = _vae(), _x(8)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    svi.step(x)
    unchanged = [k for k, v in vae.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged


def test_two_named_vaes_share_one_trace() -> None:
    a, b = _vae(name="left"), _vae(name="right", latent_dim=2)

    def both(x: torch.Tensor) -> None:
        a.model(x)
        b.model(x)

    names = set(poutine.trace(both).get_trace(_x()).stochastic_nodes)
    assert {"left.z", "right.z"} <= names


def test_config_round_trip_and_validation() -> None:
    config = VAEConfig(64, 5, (32, 16), "full", {"tril_scale": 0.1}, (8, 8))
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="image_shape"):
        VAEConfig(64, 5, image_shape=(7, 7))
    with pytest.raises(ValueError, match="latent_dim must be <="):
        VAEConfig(64, 10_000)
    with pytest.raises(ValueError, match="unknown VAEConfig fields"):
        VAEConfig.from_dict({"data_dim": 4, "colour": "red"})
