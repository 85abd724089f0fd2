"""Hierarchical VAEs: Gaussian layers p(z_l | z_{l+1}), bottom-up and ladder posteriors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from .distributions import NoiseScoredNormal
from .guides import MIN_SCALE, AmortizedGuide
from .networks import MLP, check_hidden_dims

__all__ = [
    "INFERENCES",
    "BottomUpPosterior",
    "GaussianLayer",
    "LadderPosterior",
    "TopDownPosterior",
    "guide_input",
    "join",
    "merge_gaussians",
]

#: Inference schemes of an L-layer model: ``bottom-up``, ``top-down`` and ``ladder``.
INFERENCES = ("bottom-up", "top-down", "ladder")

#: What the decoder of an L-layer model reads: ``z1`` (p(x | z_1)) or ``all`` (p(x | z_1..z_L)).
DECODER_INPUTS = ("z1", "all")


def join(a: Tensor, b: Tensor | None) -> Tensor:
    """[a, b] along the last dim after broadcasting the leading dims; a alone when b is None."""
    if b is None:
        return a
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.to(a).expand(*lead, b.shape[-1])], -1)


def guide_input(guide: AmortizedGuide, x: Tensor, z: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """What a layer guide reads, [x, z]: the pair itself when its trunk takes its input as
    parts (``trunk.takes_parts``; x ``(B, P)`` then goes through the first layer once, not
    once per particle of z ``(K, B, D)``), else :func:`join`'s concatenation."""
    if getattr(getattr(guide, "trunk", None), "takes_parts", False):
        return x, z.to(x)
    return join(x, z)


class GaussianHead(nn.Module):
    """Mean and positive scale ``(*, D)`` from features ``(*, H)``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(in_dim, out_dim)
        self.raw_scale = nn.Linear(in_dim, out_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.loc(h), F.softplus(self.raw_scale(h)) + MIN_SCALE


class GaussianLayer(nn.Module):
    r"""A generative layer :math:`p(z_l | z_{l+1}) = \mathcal{N}(\mu(z_{l+1}), \sigma^2(z_{l+1}))`.

    ``(*, D_{l+1}) -> (*, D_l)``: a trunk (softplus MLP unless one is given) and two heads.

    Args:
        in_dim: Size of the layer above, D_{l+1}.
        hidden_dims: Widths of the trunk.
        out_dim: Size of this layer, D_l.
        trunk: A trunk ``(*, in_dim) -> (*, hidden_dims[-1])`` replacing the MLP.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dims = check_hidden_dims(hidden_dims)
        self.trunk = trunk or MLP(in_dim, dims[:-1], dims[-1], final_activation=True)
        self.head = GaussianHead(dims[-1], out_dim)

    def loc_scale(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and scale ``(*, D_l)`` for the layer above ``(*, D_{l+1})``."""
        return self.head(self.trunk(z))

    def forward(self, z: Tensor) -> Distribution:
        """p(z_l | z_{l+1}): batch ``(*)``, event ``(D_l,)``."""
        return NoiseScoredNormal(*self.loc_scale(z)).to_event(1)


def merge_gaussians(
    loc_a: Tensor, scale_a: Tensor, loc_b: Tensor, scale_b: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Precision-weighted product of two diagonal Gaussians (Sonderby et al. 2016, eq. 19).

    .. math:: \sigma^2 = (\sigma_a^{-2} + \sigma_b^{-2})^{-1}, \quad
              \mu = (\mu_a \sigma_a^{-2} + \mu_b \sigma_b^{-2}) \sigma^2
    """
    precision_a, precision_b = scale_a.pow(-2), scale_b.pow(-2)
    variance = 1.0 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()


class BottomUpPosterior(nn.Module):
    r"""q(z_1 | x) q(z_2 | z_1, x) ... q(z_L | z_{L-1}, x), each layer a registered guide.

    Layer 1 is an amortized guide of x; layer l > 1 one of ``[x, z_{l-1}]``. Every guide family
    of ``GUIDES`` on R^D serves as a layer.

    Args:
        layers: The L guides, from z_1 (next to x) to z_L.
    """

    order = "bottom-up"

    def __init__(self, layers: Sequence[AmortizedGuide]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.data_dim = self.layers[0].data_dim

    def posterior(self, index: int, x: Tensor, below: Tensor | None) -> Distribution:
        """q(z_{index+1} | x, z_index): x ``(*, B, P)``, ``below`` the layer under it."""
        layer = self.layers[index]
        return layer(x if index == 0 else guide_input(layer, x, below))

    def loc_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gaussian base of the top layer q(z_L | x, ...) with the layers below at their means.

        What a VampPrior on the top layer mixes: mean, scale ``(B, D_L)`` and context.
        """
        below = None
        for index, layer in enumerate(self.layers):
            parameters = layer.loc_scale(x if index == 0 else guide_input(layer, x, below))
            below = parameters[0]
        return parameters


class TopDownPosterior(nn.Module):
    r"""q(z_L | x) q(z_{L-1} | z_L, x) ... q(z_1 | z_2, x), each layer a registered guide.

    The posterior of the VampPrior paper's HVAE (Tomczak & Welling 2018): the top layer is an
    amortized guide of x, layer l < L one of ``[x, z_{l+1}]``, sampled from the top down like
    the model, so a VampPrior on z_L mixes the top layer's own q(z_L | u_k).

    Args:
        layers: The L guides, from z_1 (next to x) to z_L.
    """

    order = "top-down"

    def __init__(self, layers: Sequence[AmortizedGuide]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.data_dim = self.layers[-1].data_dim

    def posterior(self, index: int, x: Tensor, above: Tensor | None) -> Distribution:
        """q(z_{index+1} | x, z_{index+2}): x ``(*, B, P)``, ``above`` the layer over it."""
        layer = self.layers[index]
        return layer(x if index == len(self.layers) - 1 else guide_input(layer, x, above))

    def loc_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gaussian base of q(z_L | x): mean, scale ``(B, D_L)`` and context."""
        return self.layers[-1].loc_scale(x)


class LadderPosterior(nn.Module):
    r"""The ladder posterior (Sonderby et al. 2016): a deterministic bottom-up pass merged with
    the generative top-down pass.

    Bottom-up: :math:`d_1 = h(x)`, :math:`d_{l+1} = f_l(d_l)`, each with Gaussian parameters
    :math:`(\hat\mu_l, \hat\sigma_l)`. Top-down: :math:`q(z_L|x) = \mathcal{N}(\hat\mu_L,
    \hat\sigma_L^2)` and, below it, q(z_l | z_{l+1}, x) is the precision-weighted product of
    :math:`\mathcal{N}(\hat\mu_l, \hat\sigma_l^2)` and the model's p(z_l | z_{l+1})
    (:func:`merge_gaussians`).

    References:
        Ladder Variational Autoencoders (Sonderby et al., 2016)

    Args:
        data_dim: Input size P (plus the conditioning width).
        latent_dims: Layer sizes from z_1 to z_L.
        hidden_dims: Widths of the trunk h(x); the upward maps keep the last width.
        trunk: A trunk ``(*, P) -> (*, hidden_dims[-1])`` replacing the MLP.
    """

    order = "top-down"

    def __init__(
        self,
        data_dim: int,
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int],
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dims = check_hidden_dims(hidden_dims)
        self.data_dim, width = data_dim, dims[-1]
        self.trunk = trunk or MLP(data_dim, dims[:-1], width, final_activation=True)
        self.up = nn.ModuleList(
            MLP(width, (), width, final_activation=True) for _ in latent_dims[1:]
        )
        self.heads = nn.ModuleList(GaussianHead(width, size) for size in latent_dims)

    def bottom_up(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The bottom-up Gaussian parameters of every layer, from z_1 to z_L."""
        d = self.trunk(x)
        out = [self.heads[0](d)]
        for up, head in zip(self.up, self.heads[1:], strict=True):
            d = up(d)
            out.append(head(d))
        return out

    def posterior(
        self, up: tuple[Tensor, Tensor], prior: tuple[Tensor, Tensor] | None
    ) -> Distribution:
        """q of one layer from its bottom-up parameters and p(z_l | z_{l+1}) (None: the top)."""
        loc, scale = up if prior is None else merge_gaussians(*up, *prior)
        return NoiseScoredNormal(loc, scale).to_event(1)

    def loc_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(z_L | x): mean, scale ``(B, D_L)`` and the top features (for a VampPrior)."""
        d = self.trunk(x)
        for up in self.up:
            d = up(d)
        return (*self.heads[-1](d), d)
