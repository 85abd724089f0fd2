"""Amortized Householder Sylvester flow: per-datapoint triangular matrices and reflections."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ..networks import MLP
from ..validation import check_positive_int
from .base import FlowGuide, register_guide

__all__ = ["ConditionedHouseholderSylvester", "HouseholderSylvesterGuide"]


def reflect(v: Tensor, z: Tensor) -> Tensor:
    """Householder reflection ``(I - 2 v v^T / |v|^2) z`` of z ``(..., D)`` by v ``(..., D)``."""
    return z - 2.0 * v * (v * z).sum(-1, keepdim=True) / v.pow(2).sum(-1, keepdim=True)


class ConditionedHouseholderSylvester(Transform):
    r"""One Sylvester map with per-datapoint parameters; inverse only through the cache.

    .. math:: y = x + Q R \tanh(\tilde R Q^\top x + b), \quad Q = H_1 \cdots H_M, \quad
              \log |\det J| = \sum_i \log |1 + \tanh'(\tilde R Q^\top x + b)_i
              R_{ii} \tilde R_{ii}|

    R and R~ are upper triangular with diagonals in (-1, 1), so every factor is positive
    and the map is invertible.

    Args:
        r: R ``(B, D, D)``, upper triangular.
        r_tilde: R~ ``(B, D, D)``, upper triangular.
        b: Bias ``(B, D)``.
        vectors: Householder vectors v_1..v_M ``(B, M, D)``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, r: Tensor, r_tilde: Tensor, b: Tensor, vectors: Tensor) -> None:
        super().__init__(cache_size=1)
        self.r, self.r_tilde, self.b, self.vectors = r, r_tilde, b, vectors
        self._cached_log_det: Tensor | None = None

    def _q_transpose(self, z: Tensor) -> Tensor:
        for m in range(self.vectors.shape[-2]):  # Q^T = H_M ... H_1: apply H_1 first
            z = reflect(self.vectors[..., m, :], z)
        return z

    def _q(self, z: Tensor) -> Tensor:
        for m in reversed(range(self.vectors.shape[-2])):
            z = reflect(self.vectors[..., m, :], z)
        return z

    def _call(self, x: Tensor) -> Tensor:
        pre = (self.r_tilde @ self._q_transpose(x).unsqueeze(-1)).squeeze(-1) + self.b
        act = torch.tanh(pre)
        y = x + self._q((self.r @ act.unsqueeze(-1)).squeeze(-1))
        diag = torch.diagonal(self.r, dim1=-2, dim2=-1) * torch.diagonal(
            self.r_tilde, dim1=-2, dim2=-1
        )
        self._cached_log_det = torch.log1p((1 - act.pow(2)) * diag).sum(-1)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError(
            "the Sylvester map has no analytic inverse; it scores only its own samples"
        )

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old:
            self(x)  # recomputes y and the log-determinant for this x
        return self._cached_log_det


class _SylvesterParameters(nn.Module):
    """Maps h(x) ``(B, C)`` to R, R~ ``(B, D, D)``, b ``(B, D)`` and M Householder vectors."""

    def __init__(
        self, context_dim: int, latent_dim: int, hidden_dims: Sequence[int], num_householder: int
    ) -> None:
        super().__init__()
        d, num_strict = latent_dim, latent_dim * (latent_dim - 1) // 2
        self.sizes = [num_strict, num_strict, d, d, d, num_householder * d]
        self.net = MLP(context_dim, hidden_dims, sum(self.sizes))
        self.latent_dim, self.num_householder = latent_dim, num_householder
        rows, cols = torch.triu_indices(latent_dim, latent_dim, offset=1)
        self.register_buffer("flat", rows * latent_dim + cols, persistent=False)

    def _upper(self, strict: Tensor, raw_diag: Tensor) -> Tensor:
        d = self.latent_dim
        flat = strict.new_zeros(*strict.shape[:-1], d * d).index_copy(-1, self.flat, strict)
        return flat.reshape(*strict.shape[:-1], d, d) + torch.diag_embed(torch.tanh(raw_diag))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """R, R~ ``(B, D, D)``, b ``(B, D)`` and vectors ``(B, M, D)`` for context ``(B, C)``."""
        strict, strict_t, r_diag, rt_diag, b, v = self.net(h).split(self.sizes, dim=-1)
        vectors = v.reshape(*v.shape[:-1], self.num_householder, self.latent_dim)
        return self._upper(strict, r_diag), self._upper(strict_t, rt_diag), b, vectors


@register_guide("sylvester")
class HouseholderSylvesterGuide(FlowGuide):
    r"""Diagonal Gaussian pushed through amortized Householder Sylvester maps.

    .. math:: z_k = z_{k-1} + Q R \tanh(\tilde R Q^\top z_{k-1} + b), \quad
              Q = H_1 \cdots H_M, \quad H_m = I - 2 v_m v_m^\top / \|v_m\|^2

    R, R~ (upper triangular, diagonals tanh-bounded in (-1, 1)), b and the Householder
    vectors v_m of every map are predicted per datapoint from h(x), so Q is orthogonal and
    each map invertible. There is no analytic inverse: the guide scores its own samples.

    References:
        Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018)

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
        num_flows: Number of maps K.
        flow_hidden_dims: Hidden widths of each map's parameter network; default ``(10 * D,)``.
        num_householder: Reflections M per map, at least 1.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
        num_householder: int = 8,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims, num_flows, flow_hidden_dims)
        check_positive_int("num_householder", num_householder)
        self.num_householder = num_householder
        self.flows.extend(
            _SylvesterParameters(
                self.context_dim, latent_dim, self.flow_hidden_dims, num_householder
            )
            for _ in range(num_flows)
        )

    def transforms(self, h: Tensor) -> list[Transform]:
        return [ConditionedHouseholderSylvester(*flow(h)) for flow in self.flows]
