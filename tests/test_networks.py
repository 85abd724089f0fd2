"""Gated networks: the closed form of a gated layer, shapes, and the ``gated`` arch end to end;
inputs given as parts."""

from __future__ import annotations

import pytest
import torch
from robust_helpers import adam_losses

from pyro_vae import VAE, VAEConfig
from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.hierarchy import join
from pyro_vae.networks import MLP, Decoder, GatedDense, GatedMLP, PartwiseLinear


def test_gated_dense_is_value_times_sigmoid_gate() -> None:
    torch.manual_seed(0)
    layer = GatedDense(5, 3)
    x = torch.randn(7, 5)
    value = x @ layer.value.weight.T + layer.value.bias
    gate = 1 / (1 + torch.exp(-(x @ layer.gate.weight.T + layer.gate.bias)))
    assert torch.allclose(layer(x), value * gate, atol=1e-6)
    with torch.no_grad():  # a closed gate switches its unit off for every input
        layer.gate.bias[1] = -1e4
    assert torch.all(layer(x)[:, 1] == 0) and torch.all(layer(x)[:, 0] != 0)


def test_gated_networks_accept_any_leading_shape() -> None:
    torch.manual_seed(1)
    trunk, decoder = GatedMLP(6, (8, 5)), Decoder(3, (5, 8), 6, gated=True)
    assert trunk.out_dim == 5
    x = torch.rand(4, 2, 6)
    h = trunk(x)
    assert h.shape == (4, 2, 5) and torch.allclose(h[3], trunk(x[3]), atol=1e-6)
    z = torch.randn(2, 4, 3)
    logits = decoder(z)
    assert logits.shape == (2, 4, 6) and torch.allclose(logits[1], decoder(z[1]), atol=1e-6)
    with pytest.raises(ValueError, match="hidden_dims"):
        GatedMLP(6, ())


def test_gated_arch_builds_trains_and_round_trips(tmp_path) -> None:
    torch.manual_seed(2)
    protos = (torch.rand(3, 36) < 0.4).float()
    clean = protos[torch.arange(48) % 3]
    x = torch.where(torch.rand(48, 36) < 0.05, 1 - clean, clean)
    config = VAEConfig(36, 2, (16, 12), "full", image_shape=(6, 6), arch="gated")
    vae = VAE(config)
    assert isinstance(vae.encoder.trunk, GatedMLP) and isinstance(vae.decoder.net[0], GatedMLP)
    assert vae.encoder.context_dim == 12 and vae.decoder.net[0][0].value.in_features == 2
    losses = adam_losses(vae, x, steps=120, lr=1e-2)
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    save_checkpoint(tmp_path / "gated.pt", vae)
    again, _ = load_checkpoint(tmp_path / "gated.pt")
    assert again.config.arch == "gated"
    z = torch.randn(5, 2)
    assert torch.equal(again.decoder(z), vae.decoder(z))
    assert torch.equal(again.encoder(x).mean, vae.encoder(x).mean)


# ---------------------------------------------------------------- inputs given as parts


@pytest.mark.parametrize(
    "make",
    [
        lambda: PartwiseLinear(7, 4),
        lambda: MLP(7, (6,), 4, final_activation=True),
        lambda: GatedMLP(7, (6, 4)),
    ],
    ids=["linear", "mlp", "gated"],
)
def test_parts_are_the_concatenation_without_building_it(make) -> None:  # noqa: ANN001
    """net((x, z)) = net([x, z]) in value and in every gradient, x ``(B, 5)`` broadcast
    against the particles of z ``(K, B, 2)``; parts that do not fill the input are refused."""
    torch.manual_seed(2)
    net = make()
    x = torch.rand(3, 5, requires_grad=True)
    z = torch.randn(4, 3, 2, requires_grad=True)
    by_parts = net((x, z))
    joined = net(join(x, z))
    assert by_parts.shape == joined.shape == (4, 3, 4)
    assert torch.allclose(by_parts, joined, atol=1e-6)
    weights = torch.randn_like(joined)
    wrt = [x, z, *net.parameters()]
    for a, b in zip(
        torch.autograd.grad((by_parts * weights).sum(), wrt),
        torch.autograd.grad((joined * weights).sum(), wrt),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match=r"parts of widths \[5, 3\] do not add up to .* 7"):
        net((x, torch.randn(3, 3)))
