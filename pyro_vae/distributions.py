"""Distributions with cheaper exact densities for the guides' own reparameterized samples."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.multivariate_normal import _batch_mv
from torch.distributions.utils import _standard_normal, lazy_property

__all__ = [
    "CholeskyMultivariateNormal",
    "DiagonalNormalMixture",
    "NoiseScoredNormal",
    "StandardNormal",
    "TriangularFactorNormal",
]

_EMPTY = torch.Size()
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _own_noise(q: dist.Distribution, value: Tensor, *params: Tensor) -> Tensor | None:
    """The eps of ``value`` when it is ``q``'s own last draw and may be scored from it.

    The noise form's gradient is right when ``value`` carries its graph back to ``params``
    (a reparameterized draw) or no gradient of them is wanted. A draw made without a graph
    (``sample()``, as score-function estimators use) must take the general formula, whose
    gradient holds z fixed: then, and for any other value, this returns None.
    """
    draw = getattr(q, "_last_draw", None)
    if draw is None or value is not draw[0]:
        return None
    wants_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    return draw[1] if value.requires_grad or not wants_grad else None


class NoiseScoredNormal(dist.Normal):
    r"""``Normal(loc, scale)`` that scores its own reparameterized draws from their noise.

    A draw z = loc + scale * eps keeps eps; ``log_prob`` of that very tensor is

    .. math:: \log q(z) = -\tfrac12 \epsilon^2 - \log \sigma - \tfrac12 \log 2\pi,

    equal to the usual form in value and in its total gradient (``(z - loc) / scale`` is
    eps), with fewer operations. Any other value, or a draw without a graph (``sample()``,
    as score-function estimators use), takes the usual formula. Elementwise, like
    ``Normal``; the guides wrap it with ``.to_event(1)``.
    """

    def rsample(self, sample_shape: torch.Size = _EMPTY) -> Tensor:
        """A draw of shape ``sample_shape + batch_shape``; remembers its eps."""
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + eps * self.scale
        self._last_draw = (z, eps)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        eps = _own_noise(self, value, self.loc, self.scale)
        if eps is None:
            return super().log_prob(value)
        return -0.5 * eps.square() - self.scale.log() - _HALF_LOG_2PI


class StandardNormal(dist.Normal):
    """``Normal(0, 1)`` whose log density skips the location and scale: the prior N(0, I).

    Built like ``Normal`` from ``loc`` (zeros) and ``scale`` (ones), which fix its device,
    dtype and batch shape; ``log_prob(z) = -z^2 / 2 - log(2 pi) / 2`` elementwise.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        out = -0.5 * value.square() - _HALF_LOG_2PI
        shape = torch.broadcast_shapes(out.shape, self.batch_shape)
        return out if out.shape == shape else out.expand(shape)


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

    def _factor_params(self) -> tuple[Tensor, ...]:
        """The tensors the draws are a function of (for :func:`_own_noise`)."""
        return self.loc, self._unbroadcasted_scale_tril

    def _half_log_det(self) -> Tensor:
        """sum_i log L_ii, shape ``batch_shape``."""
        return self._unbroadcasted_scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """log q(value), shape ``sample_shape + batch_shape``."""
        eps = _own_noise(self, value, *self._factor_params())
        if eps is None:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        half_log_det = self._half_log_det()
        log_normal = -0.5 * (eps.square().sum(-1) + self._event_shape[0] * math.log(2 * math.pi))
        return log_normal - half_log_det


class TriangularFactorNormal(CholeskyMultivariateNormal):
    r"""N(loc, L L^T) with L built from a diagonal scale and a strictly lower-triangular S.

    .. math:: L = \operatorname{diag}(s) (I + c S) \ \text{(``tril_scale`` c given)}, \qquad
              L = \operatorname{diag}(s) + S \ \text{(``tril_scale=None``)}

    Both have diag(L) = s. Its own draws never form L: z = loc + s * (eps + c S eps) (or
    loc + s * eps + S eps) takes one batched matrix-vector product, and their log density
    is -sum_i((eps_i^2 + log 2 pi) / 2 + log s_i). ``scale_tril``, the covariance, the
    log density of other values and KL divergences form L on first use, as a
    ``MultivariateNormal``. Batch shape ``(B,)``, event shape ``(D,)``.

    Args:
        loc: Mean ``(B, D)``.
        scale: Diagonal of L, ``(B, D)``, positive.
        strict: S ``(B, D, D)``, zero on and above the diagonal.
        tril_scale: c, or None for the additive form.
    """

    def __init__(
        self, loc: Tensor, scale: Tensor, strict: Tensor, tril_scale: float | None = None
    ) -> None:
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape[:-1], strict.shape[:-2])
        event_shape = loc.shape[-1:]
        self.loc = loc.expand(batch_shape + event_shape)
        self.scale_diag, self.strict, self.tril_scale = scale, strict, tril_scale
        # MultivariateNormal.__init__ needs L itself; this class forms it only when asked
        dist.TorchDistribution.__init__(self, batch_shape, event_shape, validate_args=False)

    @lazy_property
    def _unbroadcasted_scale_tril(self) -> Tensor:
        """L ``(B, D, D)``, formed on first use."""
        if self.tril_scale is None:
            return self.strict + torch.diag_embed(self.scale_diag)
        eye = torch.eye(self._event_shape[0], dtype=self.strict.dtype, device=self.strict.device)
        return self.scale_diag.unsqueeze(-1) * (eye + self.tril_scale * self.strict)

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> TriangularFactorNormal:
        shape = torch.Size(batch_shape)
        d = self._event_shape[0]
        return TriangularFactorNormal(
            self.loc.expand(shape + (d,)),
            self.scale_diag.expand(shape + (d,)),
            self.strict.expand(shape + (d, d)),
            self.tril_scale,
        )

    def rsample(self, sample_shape: torch.Size = _EMPTY) -> Tensor:
        """A draw of shape ``sample_shape + batch_shape + (D,)``; remembers its eps."""
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        mixed = _batch_mv(self.strict, eps)  # S eps
        if self.tril_scale is None:
            z = self.loc + self.scale_diag * eps + mixed
        else:
            z = self.loc + self.scale_diag * (eps + self.tril_scale * mixed)
        self._last_draw = (z, eps)
        return z

    def _factor_params(self) -> tuple[Tensor, ...]:
        return self.loc, self.scale_diag, self.strict

    def _half_log_det(self) -> Tensor:
        return self.scale_diag.log().sum(-1)


class DiagonalNormalMixture(dist.TorchDistribution):
    r"""Mixture of K diagonal Gaussians, scored by matrix products: batch ``()``, event ``(D,)``.

    .. math:: \log p(z) = \operatorname{logsumexp}_k \Big[\log w_k - \sum_d \log s_{kd}
              - \tfrac{D}{2} \log 2\pi - \tfrac12 \sum_d \frac{(z_d - m_{kd})^2}{s_{kd}^2}\Big]

    The K quadratic forms of all N values come from two ``(N, D) x (D, K)`` products,
    :math:`z^2 P^\top - 2 z (M \odot P)^\top + \sum_d M^2 \odot P` with P = 1 / s^2, in
    place of the ``(N, K, D)`` tensors a broadcast ``MixtureSameFamily`` builds: the same
    density, about 20x faster to score 5000 draws per image under a 100-component prior.
    The expanded form cancels: in float32, with components as narrow as s = 0.05, values
    are off by up to about 1e-3 nats (float64 or wider components: far less). Pyro expands
    it to plate shapes with ``ExpandedDistribution``.

    Args:
        locs: Component means m ``(K, D)``.
        scales: Component scales s ``(K, D)``, positive.
        logits: Unnormalized log weights ``(K,)``.
    """

    arg_constraints = {
        "locs": constraints.real,
        "scales": constraints.positive,
        "logits": constraints.real,
    }
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self, locs: Tensor, scales: Tensor, logits: Tensor, validate_args: bool | None = None
    ) -> None:
        if locs.dim() != 2 or scales.shape != locs.shape or logits.shape != locs.shape[:1]:
            raise ValueError(
                f"locs and scales must be (K, D) and logits (K,), got {tuple(locs.shape)}, "
                f"{tuple(scales.shape)} and {tuple(logits.shape)}"
            )
        self.locs, self.scales, self.logits = locs, scales, logits
        super().__init__(_EMPTY, locs.shape[1:], validate_args=validate_args)

    def sample(self, sample_shape: torch.Size = _EMPTY) -> Tensor:
        """Draws ``sample_shape + (D,)``: a component k ~ Categorical(w), then N(m_k, s_k^2)."""
        with torch.no_grad():
            k = dist.Categorical(logits=self.logits).sample(torch.Size(sample_shape))
            eps = _standard_normal(
                self._extended_shape(sample_shape), dtype=self.locs.dtype, device=self.locs.device
            )
            return self.locs[k] + self.scales[k] * eps

    def log_prob(self, value: Tensor) -> Tensor:
        """log p(value) for ``value`` of shape ``(..., D)``; returns ``(...)``."""
        if self._validate_args:
            self._validate_sample(value)
        precision = self.scales.pow(-2)  # (K, D)
        weighted = self.locs * precision
        offset = (self.locs * weighted).sum(-1)  # (K,)
        quadratic = value.square() @ precision.T - 2 * (value @ weighted.T) + offset  # (..., K)
        log_norm = self.scales.log().sum(-1) + self._event_shape[0] * _HALF_LOG_2PI  # (K,)
        log_weights = torch.log_softmax(self.logits, -1)
        return torch.logsumexp(log_weights - log_norm - 0.5 * quadratic, -1)
