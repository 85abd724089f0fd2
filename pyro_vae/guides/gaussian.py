"""Gaussian guides: mean-field (``diagonal``) and full covariance (``full``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ..distributions import TriangularFactorNormal
from .base import AmortizedGuide, register_guide

__all__ = ["DiagonalNormalGuide", "FullCovarianceGuide"]


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
        # the L' head starts at zero, so q starts diagonal; D = 1 has no off-diagonal entries
        self.tril = nn.Linear(self.context_dim, len(rows)) if len(rows) else None
        if self.tril is not None:
            nn.init.zeros_(self.tril.weight)
            nn.init.zeros_(self.tril.bias)

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean ``(B, D)``, sigma ``(B, D)`` and the strictly lower-triangular L' ``(B, D, D)``."""
        loc, scale, h = self.loc_scale(x)
        size = self.latent_dim * self.latent_dim
        strict = h.new_zeros(*h.shape[:-1], size)
        if self.tril is not None:  # index_copy: cheaper than a 2-d index_put
            strict = strict.index_copy(-1, self.flat_index, self.tril(h))
        return loc, scale, strict.unflatten(-1, (self.latent_dim, self.latent_dim))

    def scale_tril(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(B, D)`` and Cholesky factor L ``(B, D, D)``, diag(L) = sigma > 0."""
        q = self(x)
        return q.loc, q.scale_tril

    def forward(self, x: Tensor) -> Distribution:
        loc, scale, strict = self.factors(x)
        # lower triangular with a positive diagonal by construction: no validation needed
        scaled = self.parameterization == "scaled"
        return TriangularFactorNormal(loc, scale, strict, self.tril_scale if scaled else None)
