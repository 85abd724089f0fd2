"""Amortized posteriors q(z|x): the AmortizedGuide base, the GUIDES registry, every family."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from .distributions import CholeskyMultivariateNormal
from .networks import MLP, check_hidden_dims

__all__ = [
    "GUIDES",
    "AmortizedGuide",
    "DiagonalNormalGuide",
    "FullCovarianceGuide",
    "make_guide",
    "register_guide",
]

#: Registry of guide families, key -> class; the CLI's ``--guide`` choices and the tests read it.
GUIDES: dict[str, type[AmortizedGuide]] = {}

MIN_SCALE = 1e-4


def register_guide(key: str) -> Callable[[type[AmortizedGuide]], type[AmortizedGuide]]:
    """Class decorator adding a guide family to ``GUIDES`` under ``key``."""

    def add(cls: type[AmortizedGuide]) -> type[AmortizedGuide]:
        if key in GUIDES:
            raise ValueError(f"guide {key!r} is already registered by {GUIDES[key].__name__}")
        GUIDES[key] = cls
        cls.key = key
        return cls

    return add


def make_guide(
    key: str, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (400,), **options: Any
) -> AmortizedGuide:
    """Build the guide registered under ``key``; ``options`` go to its constructor."""
    if key not in GUIDES:
        raise ValueError(f"unknown guide {key!r}; choose one of {', '.join(sorted(GUIDES))}")
    try:
        return GUIDES[key](data_dim, latent_dim, hidden_dims, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options!r} for guide {key!r}: {error}") from None


class AmortizedGuide(nn.Module):
    """Encoder trunk h(x) and a diagonal Gaussian head; ``forward(x)`` returns q(z|x).

    Subclasses implement ``__init__`` and ``forward``; ``forward`` returns a distribution with
    batch shape ``(B,)`` and event shape ``(D,)`` for ``x`` of shape ``(B, P)``.

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
    """

    key: str = ""

    def __init__(
        self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (400,)
    ) -> None:
        super().__init__()
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        dims = check_hidden_dims(hidden_dims)
        self.data_dim, self.latent_dim, self.context_dim = data_dim, latent_dim, dims[-1]
        self.trunk = MLP(data_dim, dims[:-1], dims[-1], final_activation=True)
        self.loc = nn.Linear(self.context_dim, latent_dim)
        self.raw_scale = nn.Linear(self.context_dim, latent_dim)

    def loc_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean ``(B, D)``, positive scale ``(B, D)`` and context h(x) ``(B, C)``."""
        h = self.trunk(x)
        return self.loc(h), F.softplus(self.raw_scale(h)) + MIN_SCALE, h

    def diagonal_normal(self, x: Tensor) -> tuple[Distribution, Tensor]:
        """Base Gaussian N(mu(x), diag sigma(x)^2) (batch ``(B,)``, event ``(D,)``) and h(x)."""
        loc, scale, h = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1), h

    def forward(self, x: Tensor) -> Distribution:
        raise NotImplementedError


@register_guide("diagonal")
class DiagonalNormalGuide(AmortizedGuide):
    r"""Mean-field Gaussian.

    .. math:: q(z|x) = \mathcal{N}(z; \mu(x), \operatorname{diag} \sigma^2(x))
    """

    def forward(self, x: Tensor) -> Distribution:
        return self.diagonal_normal(x)[0]


@register_guide("full")
class FullCovarianceGuide(AmortizedGuide):
    r"""Full-covariance Gaussian, z = mu + L eps (Kingma & Welling 2019, Algorithm 2).

    The encoder returns mu, sigma and a strictly lower-triangular L'. With
    ``parameterization="scaled"`` (default)

    .. math:: L = \operatorname{diag}(\sigma) (I + c L'), \qquad c = \text{tril\_scale}

    so L stays lower triangular with diagonal sigma > 0, each row moves relative to its own
    scale, and the small c acts as a learning rate of L' built into the model (plain
    Algorithm 2 lets Adam inject x-independent noise into z early on and the code collapses).
    ``parameterization="plain"`` is Algorithm 2 as written: L = mask * L' + diag(sigma).
    Either way log q(z|x) = -sum_i ((eps_i^2 + log 2 pi) / 2 + log sigma_i).

    References:
        An Introduction to Variational Autoencoders (Kingma & Welling, 2019), Algorithm 2

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk.
        parameterization: ``"scaled"`` or ``"plain"``.
        tril_scale: c for ``"scaled"``; default 1.5 / D.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        parameterization: str = "scaled",
        tril_scale: float | None = None,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims)
        if parameterization not in ("scaled", "plain"):
            raise ValueError(
                f"parameterization must be 'scaled' or 'plain', got {parameterization!r}"
            )
        if tril_scale is not None and not tril_scale > 0:
            raise ValueError(f"tril_scale must be > 0, got {tril_scale!r}")
        self.parameterization = parameterization
        self.tril_scale = 1.5 / latent_dim if tril_scale is None else float(tril_scale)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("flat_index", rows * latent_dim + cols, persistent=False)
        self.register_buffer("eye", torch.eye(latent_dim), persistent=False)
        self.tril = nn.Linear(self.context_dim, len(rows))
        nn.init.zeros_(self.tril.weight)  # q starts diagonal
        nn.init.zeros_(self.tril.bias)

    def scale_tril(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(B, D)`` and Cholesky factor L ``(B, D, D)``, diag(L) = sigma > 0."""
        loc, scale, h = self.loc_scale(x)
        size = self.latent_dim * self.latent_dim  # index_copy: cheaper than 2-d index_put
        strict = h.new_zeros(*h.shape[:-1], size).index_copy(-1, self.flat_index, self.tril(h))
        strict = strict.unflatten(-1, (self.latent_dim, self.latent_dim))
        if self.parameterization == "plain":
            return loc, strict + torch.diag_embed(scale)
        eye = self.eye.to(h.dtype)
        return loc, scale.unsqueeze(-1) * (eye + self.tril_scale * strict)

    def forward(self, x: Tensor) -> Distribution:
        loc, scale_tril = self.scale_tril(x)
        # lower triangular with a positive diagonal by construction: no validation needed
        return CholeskyMultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)
