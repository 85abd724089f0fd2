"""Networks: the ARCHS registry of encoder-trunk/decoder pairs and their building blocks.

Every network maps the last dim and accepts any leading shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_key, registrar

__all__ = [
    "ARCHS",
    "MLP",
    "ConvDecoder",
    "ConvEncoder",
    "Decoder",
    "GatedDense",
    "GatedMLP",
    "GatedNetworks",
    "ConvNetworks",
    "MLPNetworks",
    "NetworkPair",
    "PartwiseLinear",
    "check_hidden_dims",
    "make_arch",
    "register_arch",
]


def check_hidden_dims(hidden_dims: Sequence[int]) -> tuple[int, ...]:
    """Validate layer widths and return them as a tuple."""
    dims = tuple(hidden_dims)
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"hidden_dims must be one or more positive integers, got {hidden_dims!r}")
    return dims


class PartwiseLinear(nn.Linear):
    r"""``nn.Linear`` that also takes its input as parts: a tuple ``(x_1, ..., x_n)`` of widths
    summing to ``in_features`` stands for their concatenation along the last dim.

    .. math:: W [x_1, \dots, x_n] + b = \textstyle\sum_i W_i x_i + b

    with W_i the columns of part i. The concatenation is never built and the parts' leading
    dims broadcast, so an image x ``(B, P)`` beside a latent z ``(K, B, D)`` of K particles goes
    through its columns once, not K times: ``((B, P), (K, B, D)) -> (K, B, out_features)``.
    """

    def forward(self, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        if isinstance(x, Tensor):
            return super().forward(x)
        widths = [part.shape[-1] for part in x]
        if sum(widths) != self.in_features:
            raise ValueError(
                f"parts of widths {widths} do not add up to the layer's {self.in_features} inputs"
            )
        out = self.bias
        for part, weight in zip(x, self.weight.split(widths, dim=1), strict=True):
            term = F.linear(part, weight)
            out = term if out is None else out + term
        return out


class MLP(nn.Sequential):
    """Linear layers with softplus between them: ``(*, in_dim) -> (*, out_dim)``.

    The input may come as parts (see :class:`PartwiseLinear`).

    Args:
        in_dim: Input features.
        hidden_dims: Widths of the hidden layers (may be empty).
        out_dim: Output features.
        final_activation: Apply softplus after the last layer too (for trunks).
    """

    #: Whether the input may come as parts (:class:`PartwiseLinear`).
    takes_parts = True

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, final_activation: bool = False
    ) -> None:
        dims = (in_dim, *hidden_dims, out_dim)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            layers.append(PartwiseLinear(a, b) if i == 0 else nn.Linear(a, b))
            if i < len(dims) - 2 or final_activation:
                layers.append(nn.Softplus())
        super().__init__(*layers)


class Decoder(nn.Module):
    """The likelihood's parameters given z: ``(*, D) -> (*, P)`` (e.g. Bernoulli logits).

    Args:
        latent_dim: Latent size D (plus the conditioning width of a conditional VAE).
        hidden_dims: Hidden widths, from z to pixels.
        data_dim: Number of outputs (P times the likelihood's outputs per pixel).
        gated: Gated hidden layers (:class:`GatedMLP`) instead of softplus ones; the output
            layer is linear either way.
    """

    def __init__(
        self, latent_dim: int, hidden_dims: Sequence[int], data_dim: int, gated: bool = False
    ) -> None:
        super().__init__()
        dims = check_hidden_dims(hidden_dims)
        if gated:
            self.net = nn.Sequential(GatedMLP(latent_dim, dims), nn.Linear(dims[-1], data_dim))
        else:
            self.net = MLP(latent_dim, dims, data_dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class GatedDense(nn.Module):
    r"""Gated linear layer: ``(*, in_dim) -> (*, out_dim)``.

    .. math:: h = (W x + b) \odot \sigma(V x + c)

    The gate lets each unit switch itself off per input; Dauphin et al. (2017) and the
    VampPrior paper (Tomczak & Welling, 2018) use it in place of an activation. The input may
    come as parts (see :class:`PartwiseLinear`).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.value = PartwiseLinear(in_dim, out_dim)
        self.gate = PartwiseLinear(in_dim, out_dim)

    def forward(self, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class GatedMLP(nn.Sequential):
    """Gated layers, one per width: ``(*, in_dim) -> (*, widths[-1])``; an encoder trunk.

    The input may come as parts (see :class:`PartwiseLinear`).

    Args:
        in_dim: Input features.
        widths: Output widths of the gated layers (one or more).
    """

    takes_parts = True

    def __init__(self, in_dim: int, widths: Sequence[int]) -> None:
        dims = (in_dim, *check_hidden_dims(widths))
        super().__init__(*(GatedDense(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)))
        self.out_dim = dims[-1]


def _flat(x: Tensor, num_event_dims: int) -> tuple[Tensor, torch.Size]:
    """Merge the leading dims of ``x`` into one batch dim; returns it and the leading shape."""
    lead = x.shape[: x.dim() - num_event_dims]
    return x.reshape(-1, *x.shape[x.dim() - num_event_dims :]), lead


class ConvEncoder(nn.Module):
    """Convolutional trunk for 28x28 images: ``(*, 784) -> (*, out_dim)``, softplus output.

    Two stride-2 convolutions (28 -> 14 -> 7) and a linear layer; leading dims (particles,
    outer plates) are merged for the convolutions and restored afterwards.

    Args:
        out_dim: Context size C.
        channels: Channels of the two convolutions.
        image_shape: (height, width); must be (28, 28).
    """

    def __init__(
        self,
        out_dim: int,
        channels: Sequence[int] = (32, 64),
        image_shape: Sequence[int] = (28, 28),
    ) -> None:
        super().__init__()
        _check_conv_shape(image_shape)
        c1, c2 = check_hidden_dims(channels)
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),  # 28 -> 14
            nn.Softplus(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # 14 -> 7
            nn.Softplus(),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, out_dim),
            nn.Softplus(),
        )

    def forward(self, x: Tensor) -> Tensor:
        flat, lead = _flat(x, 1)
        return self.net(flat.reshape(-1, 1, 28, 28)).reshape(*lead, self.out_dim)


class ConvDecoder(nn.Module):
    """The likelihood's parameters for 28x28 images given z: ``(*, D) -> (*, k 784)``.

    A linear layer to a 7x7 feature map, then two transposed convolutions (7 -> 14 -> 28)
    to k output maps, flattened map after map (k = 1: Bernoulli logits).

    Args:
        latent_dim: Latent size D.
        hidden_dim: Width of the first linear layer.
        channels: Channels of the 7x7 and 14x14 feature maps.
        image_shape: (height, width); must be (28, 28).
        out_channels: Output maps k (the likelihood's outputs per pixel).
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_dim: int = 256,
        channels: Sequence[int] = (64, 32),
        image_shape: Sequence[int] = (28, 28),
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        _check_conv_shape(image_shape)
        c1, c2 = check_hidden_dims(channels)
        self.c1, self.out_channels = c1, out_channels
        self.fc = MLP(latent_dim, (hidden_dim,), c1 * 7 * 7, final_activation=True)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1),  # 7 -> 14
            nn.Softplus(),
            nn.ConvTranspose2d(c2, out_channels, 4, stride=2, padding=1),  # 14 -> 28
        )

    def forward(self, z: Tensor) -> Tensor:
        flat, lead = _flat(z, 1)
        h = self.fc(flat).reshape(-1, self.c1, 7, 7)
        return self.net(h).reshape(*lead, self.out_channels * 28 * 28)


def _check_conv_shape(image_shape: Sequence[int]) -> None:
    if tuple(image_shape) != (28, 28):
        raise ValueError(f"the conv networks take 28x28 images, got image_shape {image_shape!r}")


# ---------------------------------------------------------------- the ARCHS registry

#: Registry of network pairs, key -> class; the CLI's ``--arch`` choices read it.
ARCHS: dict[str, type[NetworkPair]] = {}

#: ``@register_arch("key")``: class decorator adding a network pair to ``ARCHS``.
register_arch = registrar(ARCHS, "arch")


class NetworkPair:
    """An encoder trunk and a decoder built for one model; constructor kwargs are options.

    A part declares what it supports as class attributes: ``image_shape`` (the only
    (height, width) it takes, None for any) and ``conditional`` (whether its networks can
    take a conditioning vector concatenated to their input).
    """

    key: str = ""
    image_shape: tuple[int, int] | None = None
    conditional: bool = True

    def trunk(
        self, in_dim: int, hidden_dims: Sequence[int], image_shape: tuple[int, int]
    ) -> nn.Module | None:
        """Encoder trunk ``(*, in_dim) -> (*, C)`` with ``out_dim`` C; None: the guide's MLP."""
        return None

    def decoder(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        image_shape: tuple[int, int],
    ) -> nn.Module:
        """Decoder ``(*, in_dim) -> (*, out_dim)``; ``hidden_dims`` run from z to pixels."""
        raise NotImplementedError


@register_arch("mlp")
class MLPNetworks(NetworkPair):
    """Softplus MLPs: each guide family's own MLP trunk and a mirrored :class:`Decoder`."""

    def decoder(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, image_shape: tuple[int, int]
    ) -> nn.Module:
        return Decoder(in_dim, hidden_dims, out_dim)


@register_arch("gated")
class GatedNetworks(NetworkPair):
    """Gated linear layers of the same widths (:class:`GatedDense`) in trunk and decoder."""

    def trunk(
        self, in_dim: int, hidden_dims: Sequence[int], image_shape: tuple[int, int]
    ) -> nn.Module:
        return GatedMLP(in_dim, hidden_dims)

    def decoder(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, image_shape: tuple[int, int]
    ) -> nn.Module:
        return Decoder(in_dim, hidden_dims, out_dim, gated=True)


@register_arch("conv")
class ConvNetworks(NetworkPair):
    """28x28 images: a conv trunk of width ``hidden_dims[-1]`` and a transposed-conv decoder.

    Args:
        channels: Channels of the trunk's two convolutions (the decoder mirrors them).
    """

    image_shape = (28, 28)
    conditional = False

    def __init__(self, channels: Sequence[int] = (32, 64)) -> None:
        self.channels = check_hidden_dims(channels)
        if len(self.channels) != 2:
            raise ValueError(f"channels must be two widths, got {channels!r}")

    def trunk(
        self, in_dim: int, hidden_dims: Sequence[int], image_shape: tuple[int, int]
    ) -> nn.Module:
        return ConvEncoder(hidden_dims[-1], self.channels, image_shape)

    def decoder(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, image_shape: tuple[int, int]
    ) -> nn.Module:
        pixels = image_shape[0] * image_shape[1]
        return ConvDecoder(
            in_dim,
            hidden_dims[0],
            tuple(reversed(self.channels)),
            image_shape,
            out_channels=out_dim // pixels,
        )


def make_arch(key: str, **options: Any) -> NetworkPair:
    """The network pair registered under ``key``; ``options`` go to its constructor."""
    check_key(ARCHS, "arch", key)
    try:
        return ARCHS[key](**options)
    except TypeError as error:
        raise ValueError(f"bad options {options!r} for arch {key!r}: {error}") from None
