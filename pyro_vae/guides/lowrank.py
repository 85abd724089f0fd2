"""Low-rank-plus-diagonal Gaussian guide: a cheaper correlated alternative to ``full``."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
from torch import Tensor, nn
from torch.distributions import Distribution

from ..validation import check_positive_int
from .base import AmortizedGuide, register_guide

__all__ = ["LowRankNormalGuide"]


@register_guide("lowrank")
class LowRankNormalGuide(AmortizedGuide):
    r"""Gaussian with covariance diag(sigma) (I + c^2 W W^T) diag(sigma), W of rank r.

    .. math:: q(z|x) = \mathcal{N}\big(z; \mu(x),\;
              \operatorname{diag}\sigma^2(x) + F F^\top\big), \qquad
              F_{ik} = c\, \sigma_i(x)\, W_{ik}(x)

    The factor F costs O(D r) per image instead of the O(D^2) Cholesky factor of ``full``;
    log q uses the Woodbury identity (an r x r Cholesky). As for ``full``, the factor c
    scales W's steps relative to each row's own scale sigma_i; W starts at zero, so q starts
    diagonal.

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk.
        rank: Rank r of the correlated part, at least 1.
        factor_scale: c, greater than 0.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        rank: int = 8,
        factor_scale: float = 0.1,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims)
        check_positive_int("rank", rank)
        if not isinstance(factor_scale, (int, float)) or not factor_scale > 0:
            raise ValueError(f"factor_scale must be > 0, got {factor_scale!r}")
        self.rank, self.factor_scale = rank, float(factor_scale)
        self.factor = nn.Linear(self.context_dim, latent_dim * rank)
        nn.init.zeros_(self.factor.weight)
        nn.init.zeros_(self.factor.bias)

    def forward(self, x: Tensor) -> Distribution:
        loc, scale, h = self.loc_scale(x)  # (B, D), (B, D), (B, C)
        w = self.factor(h).unflatten(-1, (self.latent_dim, self.rank))  # (B, D, r)
        cov_factor = (self.factor_scale * scale).unsqueeze(-1) * w
        return dist.LowRankMultivariateNormal(loc, cov_factor, scale.square())
