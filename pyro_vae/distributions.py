"""Distributions with cheaper exact densities for the guides' own reparameterized samples."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions.multivariate_normal import _batch_mv
from torch.distributions.utils import _standard_normal

__all__ = ["CholeskyMultivariateNormal"]

_EMPTY = torch.Size()


class CholeskyMultivariateNormal(dist.MultivariateNormal):
    r"""``MultivariateNormal(loc, scale_tril=L)`` that scores its own samples from their noise.

    A draw z = loc + L eps keeps eps; ``log_prob`` of that very tensor is then

    .. math:: \log q(z) = -\tfrac12 \lVert\epsilon\rVert^2 - \tfrac{D}{2} \log 2\pi
              - \sum_i \log L_{ii},

    which equals the Mahalanobis form exactly (L^{-1}(z - loc) = eps) in value and in its
    total gradient, without a batched triangular solve. Any other value takes the general
    path. Batch shape ``(B,)``, event shape ``(D,)`` as for the parent class.
    """

    def rsample(self, sample_shape: torch.Size = _EMPTY) -> Tensor:
        """A draw of shape ``sample_shape + batch_shape + (D,)``; remembers its eps."""
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + _batch_mv(self._unbroadcasted_scale_tril, eps)
        self._last_draw = (z, eps)
        return z

    def _on_sampling_path(self, value: Tensor) -> bool:
        """True when the shortcut's gradient is right: value carries its graph back to loc
        and L (a reparameterized draw), or no gradient of the parameters is wanted. A draw
        made without a graph (``sample()``, as score-function estimators use) is scored by
        the general formula, whose gradient holds z fixed."""
        wants_grad = torch.is_grad_enabled() and (
            self.loc.requires_grad or self._unbroadcasted_scale_tril.requires_grad
        )
        return value.requires_grad or not wants_grad

    def log_prob(self, value: Tensor) -> Tensor:
        """log q(value), shape ``sample_shape + batch_shape``."""
        draw = getattr(self, "_last_draw", None)
        if draw is None or value is not draw[0] or not self._on_sampling_path(value):
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        eps = draw[1]
        half_log_det = self._unbroadcasted_scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_normal = -0.5 * (eps.square().sum(-1) + self._event_shape[0] * math.log(2 * math.pi))
        return log_normal - half_log_det
