"""Flow guides built from Pyro's conditional transforms: IAF, planar, radial, neural spline."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor
from torch.distributions import Transform

from .base import FlowGuide, register_guide

__all__ = [
    "PLANAR_MARGIN",
    "ConditionalStablePlanar",
    "ConditionedStablePlanar",
    "IAFGuide",
    "PlanarGuide",
    "RadialGuide",
    "SplineGuide",
]

#: delta in w.u_hat = softplus(w.u) - 1 + delta: keeps det J >= delta in floating point.
PLANAR_MARGIN = 1e-4


class ConditionedStablePlanar(ConditionedPlanar):
    r"""Pyro's planar map with the invertibility condition kept in floating point.

    Pyro sets :math:`w^\top \hat u = \operatorname{softplus}(w^\top u) - 1`, which rounds to
    exactly -1 once :math:`w^\top u` is below about -17 (float32) or -37 (float64); then
    :math:`\det J = 1 + \tanh'(a) w^\top \hat u` reaches 0 at a = 0 and log q is infinite.
    Here :math:`w^\top \hat u = \operatorname{softplus}(w^\top u) - 1 + \delta` and

    .. math:: \det J = \tanh^2(a) + (1 - \tanh^2(a))
              (\operatorname{softplus}(w^\top u) + \delta) \ge \delta > 0,
              \quad a = w^\top z + b

    is computed without cancellation.

    Args:
        params: Callable returning bias ``(B, 1)``, u ``(B, D)`` and w ``(B, D)``.
        margin: delta > 0.
    """

    def __init__(self, params: object, margin: float = PLANAR_MARGIN) -> None:
        super().__init__(params)
        self.margin = margin

    def _slope(self, u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """w.u ``(B, 1)`` and 1 + w.u_hat = softplus(w.u) + delta ``(B, 1)``."""
        alpha = (u * w).sum(-1, keepdim=True)
        return alpha, F.softplus(alpha) + self.margin

    def u_hat(self, u: Tensor, w: Tensor) -> Tensor:
        alpha, one_plus = self._slope(u, w)
        return u + (one_plus - 1 - alpha) * w / w.pow(2).sum(-1, keepdim=True)

    def _call(self, x: Tensor) -> Tensor:
        bias, u, w = self._params() if callable(self._params) else self._params
        act = torch.tanh((w * x).sum(-1, keepdim=True) + bias)
        _, one_plus = self._slope(u, w)
        square = act.pow(2)
        self._cached_logDetJ = torch.log(square + (1 - square) * one_plus).squeeze(-1)
        return x + self.u_hat(u, w) * act


class ConditionalStablePlanar(T.ConditionalPlanar):
    """``ConditionalPlanar`` whose conditioned maps are :class:`ConditionedStablePlanar`."""

    def condition(self, context: Tensor) -> ConditionedStablePlanar:
        return ConditionedStablePlanar(partial(self._params, context))


class _AutoregressiveFlowGuide(FlowGuide):
    """Autoregressive maps with the latent order reversed between consecutive maps."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims, num_flows, flow_hidden_dims)
        if min(self.flow_hidden_dims) < latent_dim:
            raise ValueError(
                f"flow_hidden_dims must be >= latent_dim ({latent_dim}) for autoregressive "
                f"networks, got {self.flow_hidden_dims!r}"
            )
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)

    def network(self, param_dims: Sequence[int]) -> ConditionalAutoRegressiveNN:
        """A MADE over z (natural order) taking the context h(x) as an extra input."""
        return ConditionalAutoRegressiveNN(
            self.latent_dim,
            self.context_dim,
            list(self.flow_hidden_dims),
            param_dims=list(param_dims),
            permutation=torch.arange(self.latent_dim),
        )

    def transforms(self, h: Tensor) -> list[Transform]:
        steps: list[Transform] = []
        for k, flow in enumerate(self.flows):
            if k > 0:
                steps.append(T.Permute(self.reverse))
            steps.append(flow.condition(h))
        return steps


@register_guide("iaf")
class IAFGuide(_AutoregressiveFlowGuide):
    r"""Inverse autoregressive flow: affine autoregressive maps conditioned on h(x).

    .. math:: z_k = \sigma_k \odot z_{k-1} + (1 - \sigma_k) \odot m_k, \quad
              (m_k, \operatorname{logit} \sigma_k) = \mathrm{MADE}_k(z_{k-1}, h(x))

    (the numerically stable update of the paper). The order of z is reversed between maps.
    Sampling and scoring a sample take one network pass per map: log q of a sample is read
    from the transform cache, never by inverting the map.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow
        (Kingma et al., 2016)

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
        num_flows: Number of maps K.
        flow_hidden_dims: Hidden widths of each MADE, each >= D; default ``(10 * D,)``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims, num_flows, flow_hidden_dims)
        self.flows.extend(
            T.ConditionalAffineAutoregressive(self.network([1, 1]), stable=True)
            for _ in range(num_flows)
        )


@register_guide("spline")
class SplineGuide(_AutoregressiveFlowGuide):
    r"""Neural spline flow: monotone rational-quadratic autoregressive maps given h(x).

    Each coordinate goes through a monotone rational-quadratic spline on ``[-bound, bound]``
    (identity outside) whose knots come from a MADE over the previous coordinates and h(x).
    The order of z is reversed between maps.

    References:
        Neural Spline Flows (Durkan et al., 2019)

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
        num_flows: Number of maps K.
        flow_hidden_dims: Hidden widths of each MADE, each >= D; default ``(10 * D,)``.
        count_bins: Spline segments per coordinate, at least 2.
        bound: Half-width of the spline's box, > 0.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
        count_bins: int = 8,
        bound: float = 3.0,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims, num_flows, flow_hidden_dims)
        if not isinstance(count_bins, int) or isinstance(count_bins, bool) or count_bins < 2:
            raise ValueError(f"count_bins must be an integer >= 2, got {count_bins!r}")
        if not isinstance(bound, (int, float)) or not bound > 0:
            raise ValueError(f"bound must be a positive number, got {bound!r}")
        self.flows.extend(
            T.ConditionalSplineAutoregressive(
                latent_dim,
                self.network([count_bins, count_bins, count_bins - 1]),
                count_bins=count_bins,
                bound=float(bound),
                order="quadratic",
            )
            for _ in range(num_flows)
        )


@register_guide("planar")
class PlanarGuide(FlowGuide):
    r"""Diagonal Gaussian pushed through amortized planar maps.

    .. math:: z_k = z_{k-1} + \hat u \tanh(w^\top z_{k-1} + b), \quad
              (u, w, b) = \mathrm{MLP}_k(h(x))

    u is replaced by :math:`\hat u = u + (\operatorname{softplus}(w^\top u) - 1 + \delta -
    w^\top u) w / \|w\|^2`, so :math:`w^\top \hat u \ge \delta - 1 > -1` for every
    parameter value, also in floating point (:class:`ConditionedStablePlanar`), and each map
    is invertible. There is no analytic inverse: the guide scores its own samples.

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
        num_flows: Number of maps K.
        flow_hidden_dims: Hidden widths of each map's parameter network; default ``(10 * D,)``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims, num_flows, flow_hidden_dims)
        self.flows.extend(
            ConditionalStablePlanar(
                T.conditional_planar(latent_dim, self.context_dim, list(self.flow_hidden_dims)).nn
            )
            for _ in range(num_flows)
        )


@register_guide("radial")
class RadialGuide(FlowGuide):
    r"""Diagonal Gaussian pushed through amortized radial maps.

    .. math:: z_k = z_{k-1} + \frac{\beta}{\alpha + r} (z_{k-1} - z_0'), \quad
              r = \|z_{k-1} - z_0'\|, \quad (z_0', \alpha, \beta) = \mathrm{MLP}_k(h(x))

    with :math:`\alpha > 0` and :math:`\beta > -\alpha` (invertible). No analytic inverse:
    the guide scores its own samples.

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
        num_flows: Number of maps K.
        flow_hidden_dims: Hidden widths of each map's parameter network; default ``(10 * D,)``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims, num_flows, flow_hidden_dims)
        self.flows.extend(
            T.conditional_radial(latent_dim, self.context_dim, list(self.flow_hidden_dims))
            for _ in range(num_flows)
        )
