"""The contract every registered guide meets; a new guide is covered with no new test code."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, VAEConfig, load_checkpoint, save_checkpoint
from pyro_vae.evaluate import log_weights
from pyro_vae.guides import GUIDES, AmortizedGuide, make_guide

KEYS = sorted(GUIDES)


def _images(num_images: int = 4, data_dim: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.full((num_images, data_dim), 0.5))


@pytest.mark.parametrize("key", KEYS)
def test_shapes_finite_log_q_and_gradients_reach_every_parameter(key: str) -> None:
    q = make_guide(key, data_dim=6, latent_dim=3, hidden_dims=(8,))
    assert isinstance(q, AmortizedGuide) and q.key == key
    post = q(_images())
    assert post.batch_shape == (4,) and post.event_shape == (3,)
    z = post.rsample((5,))
    log_q = post.log_prob(z)
    assert z.shape == (5, 4, 3) and log_q.shape == (5, 4) and log_q.isfinite().all()
    assert z.requires_grad  # reparameterized
    (z.sum() + log_q.mean()).backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("key", KEYS)
def test_samples_depend_on_the_image(key: str) -> None:
    """Amortized: the same noise gives different z for different images."""
    q = make_guide(key, data_dim=6, latent_dim=3, hidden_dims=(8,))
    x = torch.stack([torch.zeros(6), torch.ones(6)])
    pyro.set_rng_seed(3)
    z = q(x).rsample()
    pyro.set_rng_seed(3)
    z_swapped = q(x.flip(0)).rsample()
    assert not torch.allclose(z[0], z_swapped[0])  # same noise, other image
    assert not torch.allclose(z[1], z_swapped[1])


@pytest.mark.parametrize("key", KEYS)
def test_particle_plate_training_step_and_reconstruction(key: str) -> None:
    vae = VAE(VAEConfig(6, 3, (8,), key))
    x = _images()
    w = log_weights(vae, x, num_particles=7)  # guide under a (K, B) particle plate
    assert all(v.shape == (7, 4) and v.isfinite().all() for v in w.values())
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    value = loss.differentiable_loss(vae.model, vae.guide, x)
    value.backward()
    assert value.isfinite() and all(p.grad is not None for p in vae.encoder.parameters())
    recon = vae.reconstruct(x)
    assert recon.shape == (4, 6) and ((recon >= 0) & (recon <= 1)).all()


@pytest.mark.parametrize("key", KEYS)
def test_checkpoint_round_trip_gives_identical_log_q(key: str, tmp_path) -> None:
    vae = VAE(VAEConfig(6, 3, (8,), key))
    with torch.no_grad():  # leave the initialization so that a rebuilt default would differ
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(tmp_path / "c.pt", vae)
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert loaded.config == vae.config
    x = _images()
    draws = []
    for model in (vae.eval(), loaded):
        pyro.set_rng_seed(7)
        post = model.encoder(x)
        z = post.rsample((3,))
        draws.append((z, post.log_prob(z)))
    (z, log_q), (z_loaded, log_q_loaded) = draws
    assert torch.equal(z, z_loaded) and torch.equal(log_q, log_q_loaded)


@pytest.mark.parametrize("key", KEYS)
def test_unknown_options_and_bad_sizes_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        make_guide(key, 6, 3, (8,), no_such_option=1)
    with pytest.raises(ValueError, match="latent_dim"):
        make_guide(key, 6, 0, (8,))
