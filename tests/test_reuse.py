"""The VAE as a part of larger Pyro programs: site names, handlers, outer plates, custom nets."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.contrib.autoname import scope
from pyro.infer import SVI, Predictive, Trace_ELBO
from robust_helpers import adam_losses
from torch import Tensor, nn

from pyro_vae import GUIDES, VAE, VAEConfig
from pyro_vae.networks import MLP, ConvDecoder, ConvEncoder

P, D, B = 6, 2, 4


def binary(*shape: int) -> Tensor:
    return torch.bernoulli(torch.full(shape, 0.5))


def small_vae(name: str = "vae", **options: object) -> VAE:
    return VAE(VAEConfig(P, D, (8,), **{"guide": "diagonal", **options}), name=name)


def sample_sites(trace: poutine.Trace) -> dict[str, dict]:
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


def params_of(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[Tensor], module: nn.Module) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_site_names_and_shapes_are_as_documented() -> None:
    vae, x = small_vae("left"), binary(B, P)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    guide = sample_sites(guide_trace)
    model = sample_sites(poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x))
    assert set(guide) == {"left.data", "left.z"}
    assert set(model) == {"left.data", "left.z", "left.x"}
    z, obs = model["left.z"], model["left.x"]
    assert z["value"].shape == (B, D) and z["fn"].event_shape == (D,)
    assert obs["value"].shape == (B, P) and obs["fn"].event_shape == (P,) and obs["is_observed"]
    for site in (z, obs, guide["left.z"]):
        (frame,) = site["cond_indep_stack"]
        assert frame.name == "left.data" and frame.dim == -1 and frame.size == B
    assert torch.equal(z["value"], guide["left.z"]["value"])


def test_two_vaes_with_different_names_share_one_trace_and_one_svi() -> None:
    a, b = small_vae("a"), VAE(VAEConfig(P + 2, 3, (5,), "full"), name="b")
    xa, xb = binary(B, P), binary(B + 1, P + 2)

    def model(xa: Tensor, xb: Tensor) -> None:
        a.model(xa)
        b.model(xb)

    def guide(xa: Tensor, xb: Tensor) -> None:
        a.guide(xa)
        b.guide(xb)

    sites = sample_sites(poutine.trace(model).get_trace(xa, xb))
    assert set(sites) == {"a.data", "a.z", "a.x", "b.data", "b.z", "b.x"}
    assert sites["b.z"]["value"].shape == (B + 1, 3)
    before = params_of(a) + params_of(b)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(xa, xb)))
    store = set(pyro.get_param_store().keys())
    assert any(k.startswith("a.") for k in store) and any(k.startswith("b.") for k in store)
    after = list(a.parameters()) + list(b.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(before, after, strict=True))
    with pytest.raises(RuntimeError, match="a.z"):  # the same name twice is refused by Pyro

        def clash(x: Tensor) -> None:
            a.model(x)
            small_vae("a").model(x)

        poutine.trace(clash).get_trace(xa)


def test_users_own_svi_loop_trains_every_parameter() -> None:
    vae, x = small_vae(), binary(16, P)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(60)]
    stored = {id(p) for p in pyro.get_param_store().values()}
    assert stored == {id(p) for p in vae.parameters()}
    assert sum(losses[-10:]) < sum(losses[:10])


def test_condition_fixes_z_and_trains_the_decoder_alone() -> None:
    vae, x = small_vae(), binary(B, P)
    z0 = torch.randn(B, D)
    conditioned = poutine.condition(vae.model, data={"vae.z": z0})
    site = poutine.trace(conditioned).get_trace(x).nodes["vae.z"]
    assert site["is_observed"] and torch.equal(site["value"], z0)
    enc, dec = params_of(vae.encoder), params_of(vae.decoder)
    svi = SVI(conditioned, lambda x: None, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x)
    assert changed(dec, vae.decoder) and not changed(enc, vae.encoder)


def test_block_param_sites_freezes_the_decoder() -> None:
    vae, x = small_vae(), binary(B, P)
    frozen = poutine.block(vae.model, hide_types=["param"])
    enc, dec = params_of(vae.encoder), params_of(vae.decoder)
    svi = SVI(frozen, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x)
    assert changed(enc, vae.encoder)
    assert all(torch.equal(a, b) for a, b in zip(dec, vae.decoder.parameters(), strict=True))


def test_scope_prefixes_every_site() -> None:
    vae, x = small_vae(), binary(B, P)
    model = scope(vae.model, prefix="outer")
    guide = scope(vae.guide, prefix="outer")
    assert set(sample_sites(poutine.trace(model).get_trace(x))) == {
        "outer/vae.data",
        "outer/vae.z",
        "outer/vae.x",
    }
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(x)))


@pytest.mark.parametrize("num_particles", [1, 3])
def test_vae_inside_an_outer_plate(num_particles: int) -> None:
    groups, vae = 3, small_vae()
    x = binary(groups, B, P)  # the outer plate is dim -2, the VAE's data plate dim -1

    def model(x: Tensor) -> None:
        with pyro.plate("groups", groups, dim=-2):
            vae.model(x)

    def guide(x: Tensor) -> None:
        with pyro.plate("groups", groups, dim=-2):
            vae.guide(x)

    sites = sample_sites(poutine.trace(model).get_trace(x))
    assert sites["vae.z"]["value"].shape == (groups, B, D)
    assert sites["vae.x"]["fn"].batch_shape == (groups, B)
    # vectorized particles need one more dim on the left: max_plate_nesting counts both plates
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    assert torch.isfinite(torch.tensor(svi.step(x)))
    # the loss equals the sum of the per-group losses of a plain VAE (deterministic check)
    loss = Trace_ELBO(max_plate_nesting=2).differentiable_loss
    pyro.set_rng_seed(1)
    total = loss(model, guide, x)
    pyro.set_rng_seed(1)
    flat = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x.reshape(groups * B, P))
    assert torch.allclose(total, flat, rtol=1e-5)


def test_vae_inside_an_outer_model_with_a_group_latent() -> None:
    vae, x = small_vae(), binary(B, P)
    scale = torch.tensor(0.5)

    def model(x: Tensor) -> None:
        c = pyro.sample("c", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        vae.model(x, prior=dist.Normal(c, scale).to_event(1))

    def guide(x: Tensor) -> None:
        loc = pyro.param("c_loc", torch.zeros(D))
        pyro.sample("c", dist.Normal(loc, 0.1).to_event(1))
        vae.guide(x)

    trace = poutine.trace(model).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["vae.z"]
    expected = dist.Normal(trace.nodes["c"]["value"], scale).log_prob(site["value"]).sum(-1)
    assert torch.allclose(site["log_prob"], expected)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    svi.step(x)
    assert pyro.param("c_loc").abs().sum() > 0


def test_predictive_prior_samples_and_posterior_reconstructions() -> None:
    vae, x = small_vae(), binary(B, P)
    prior = Predictive(vae.model, num_samples=3)(batch_size=5)
    assert prior["vae.z"].shape == (3, 5, D) and prior["vae.x"].shape == (3, 5, P)
    assert set(prior["vae.x"].unique().tolist()) <= {0.0, 1.0}
    # posterior: z ~ q(z|x) from the guide, x resampled from p(x|z) (uncondition)
    post = Predictive(
        poutine.uncondition(vae.model), guide=vae.guide, num_samples=4000, parallel=True
    )(x)
    q = vae.encoder(x)
    assert torch.allclose(post["vae.z"].mean(0), q.mean, atol=0.1)
    assert post["vae.x"].shape == (4000, B, P) and not torch.equal(post["vae.x"][0], x)


def test_mask_and_condition_give_the_masked_likelihood() -> None:
    vae, x = small_vae(), binary(B, P)
    mask = torch.rand(B, P) < 0.5
    conditioned = poutine.condition(vae.model, data={"vae.x": x})
    trace = poutine.trace(conditioned).get_trace(batch_size=B, mask=mask)
    z = trace.nodes["vae.z"]["value"]
    logits = vae.decoder(z)
    expected = (dist.Bernoulli(logits=logits).log_prob(x) * mask).sum(-1)
    site = trace.nodes["vae.x"]
    assert torch.allclose(site["fn"].log_prob(site["value"]), expected)


def test_custom_decoder_and_encoder_modules() -> None:
    decoder = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, P))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(P, 2 * D)

        def forward(self, x: Tensor) -> dist.Distribution:
            loc, raw = self.net(x).chunk(2, dim=-1)
            return dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1)

    vae = VAE(VAEConfig(P, D, (8,), "diagonal"), decoder=decoder, encoder=Encoder())
    assert vae.decoder is decoder
    before = params_of(vae)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(binary(B, P))
    assert changed(before, vae)
    with pytest.raises(TypeError, match="decoder must be an nn.Module"):
        VAE(VAEConfig(P, D, (8,), "diagonal"), decoder=lambda z: z)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", sorted(GUIDES))
def test_every_guide_family_takes_a_custom_trunk(key: str) -> None:
    trunk = MLP(P, (7,), 5, final_activation=True)
    trunk.out_dim = 5
    options = {"latent": "sphere"} if key == "vmf" else {}
    vae = VAE(VAEConfig(P, 3, (8,), key, **options), trunk=trunk)
    assert vae.encoder.trunk is trunk and vae.encoder.context_dim == 5
    x = binary(2, B, P)
    post = vae.encoder(x)
    assert post.batch_shape == (2, B) and post.event_shape == (3,)
    post.rsample().sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def test_networks_accept_any_leading_shape() -> None:
    x = binary(3, 2, 784)
    enc, dec = ConvEncoder(11), ConvDecoder(4, hidden_dim=16)
    h = enc(x)
    assert h.shape == (3, 2, 11)
    assert torch.allclose(h[1], enc(x[1]), atol=1e-6)
    z = torch.randn(5, 3, 4)
    logits = dec(z)
    assert logits.shape == (5, 3, 784) and torch.allclose(logits[2], dec(z[2]), atol=1e-6)


def test_conv_arch_trains_on_28x28_images() -> None:
    torch.set_num_threads(1)
    protos = (torch.rand(2, 28 * 28) < 0.3).float()
    clean = protos[torch.arange(32) % 2]
    x = torch.where(torch.rand(32, 784) < 0.05, 1 - clean, clean)
    vae = VAE(VAEConfig(784, 2, (16,), "diagonal", image_shape=(28, 28), arch="conv"))
    assert isinstance(vae.encoder.trunk, ConvEncoder) and isinstance(vae.decoder, ConvDecoder)
    losses = adam_losses(vae, x, steps=40, lr=3e-3)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_library_leaves_global_state_alone() -> None:
    pyro.param("user.weight", torch.ones(2))
    vae = small_vae()
    state = torch.get_rng_state()
    images = vae.sample_images(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(images, vae.sample_images(5, generator=torch.Generator().manual_seed(3)))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(binary(B, P))
    assert torch.equal(pyro.param("user.weight"), torch.ones(2))


def test_bad_configurations_are_refused() -> None:
    assert VAEConfig(P, D, (8,), "vmf").latent == "sphere"  # implied by the guide
    with pytest.raises(ValueError, match="guide 'vmf' and latent 'euclidean' do not fit"):
        VAEConfig(P, D, (8,), "vmf", latent="euclidean")
    with pytest.raises(ValueError, match="guide 'diagonal' and latent 'sphere' do not fit"):
        VAEConfig(P, D, (8,), "diagonal", latent="sphere")
    with pytest.raises(ValueError, match="prior 'vamp' and latent 'sphere' do not fit"):
        VAEConfig(P, D, (8,), "vmf", prior="vamp")
    with pytest.raises(ValueError, match="conv.*28x28"):
        VAEConfig(P, D, (8,), "diagonal", arch="conv")
    with pytest.raises(ValueError, match="unknown arch 'cnn'"):
        VAEConfig(P, D, (8,), "diagonal", arch="cnn")
    with pytest.raises(ValueError, match="x must have shape"):
        small_vae().model(torch.ones(P))
