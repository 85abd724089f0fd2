"""Likelihoods p(x|z): the LIKELIHOODS registry, one class per factorized pixel distribution."""

from __future__ import annotations

import math
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_key, check_positive_int, registrar

__all__ = [
    "LIKELIHOODS",
    "BernoulliLikelihood",
    "BinomialLikelihood",
    "ContinuousBernoulliLikelihood",
    "GaussianLikelihood",
    "Likelihood",
    "make_likelihood",
    "register_likelihood",
]

#: Registry of likelihoods, key -> class; the CLI's ``--likelihood`` choices read it.
LIKELIHOODS: dict[str, type[Likelihood]] = {}

#: ``@register_likelihood("key")``: class decorator adding a likelihood to ``LIKELIHOODS``.
register_likelihood = registrar(LIKELIHOODS, "likelihood")


class Likelihood(nn.Module):
    """Maps the decoder's raw output ``(*, k P)`` to p(x|z), batch ``(*, P)`` (no event dim).

    A part declares what it needs and supports as class attributes:

    - ``pixels``: the kind of pixel values it scores (``binary``, ``unit-interval``, ``count``
      or ``real``, see :data:`pyro_vae.data.PIXEL_KINDS`); data are loaded in that kind.
    - ``discrete``: True when log p(x) is a log probability, False for a log density (the two
      are not comparable).

    ``outputs_per_pixel`` (k) is the decoder's width per pixel. Constructors take
    ``data_dim`` first; further arguments (the ``likelihood_options``) have defaults, and
    :meth:`options_for_data` fills those that come from the data.

    Args:
        data_dim: Number of pixels P.
    """

    key: str = ""
    pixels: str = "binary"
    discrete: bool = True

    def __init__(self, data_dim: int) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim)

    @property
    def outputs_per_pixel(self) -> int:
        """Decoder outputs per pixel k: the decoder maps ``(*, D) -> (*, k P)``."""
        return 1

    @classmethod
    def options_for_data(cls, options: dict[str, Any], train: Tensor, levels: int | None) -> dict:
        """``options`` completed from the training images ``(N, P)`` (and their ``levels``)."""
        return dict(options)

    def forward(self, out: Tensor) -> dist.Distribution:
        raise NotImplementedError

    def mean(self, out: Tensor) -> Tensor:
        """E[x|z] ``(*, P)`` for the decoder output ``(*, k P)``."""
        return self(out).mean

    def value_range(self) -> tuple[float, float] | None:
        """The range pixel values can take, for pictures; None when unbounded."""
        return (0.0, 1.0)

    def check_data(self, x: Tensor, where: str = "data") -> None:
        """ValueError (one line) when images ``(N, P)`` (floats, or integers as stored) lie
        outside this likelihood's support."""
        support = self(x.new_zeros((1, self.outputs_per_pixel * x.shape[-1]))).support
        for rows in x.reshape(-1, x.shape[-1]).split(4096):  # bounded memory for large data
            if not rows.dtype.is_floating_point:  # images stored as bytes
                rows = rows.to(torch.get_default_dtype())
            inside = support.check(rows)
            if not bool(inside.all()):
                raise ValueError(
                    f"{where}: likelihood {self.key!r} needs values in {support}, "
                    f"found {float(rows[~inside][0]):g}"
                )


@register_likelihood("bernoulli")
class BernoulliLikelihood(Likelihood):
    r"""Binary pixels: :math:`x_p \sim \mathrm{Bernoulli}(\sigma(f_p(z)))`, f_p(z) the logits."""

    pixels = "binary"

    def forward(self, out: Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=out)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)


@register_likelihood("continuous-bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    r"""Intensities in [0, 1]: the continuous Bernoulli, a proper density on the unit interval.

    .. math:: p(x|\lambda) = C(\lambda) \lambda^x (1 - \lambda)^{1-x}, \quad
              \lambda = \sigma(f(z))

    Its mean is not lambda; pictures show the mean.

    References:
        The continuous Bernoulli: fixing a pervasive error in variational autoencoders
        (Loaiza-Ganem & Cunningham, 2019)
    """

    pixels = "unit-interval"
    discrete = False

    def forward(self, out: Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=out)


@register_likelihood("binomial")
class BinomialLikelihood(Likelihood):
    r"""Integer intensities 0..L: :math:`x_p \sim \mathrm{Binomial}(L, \sigma(f_p(z)))`.

    Args:
        data_dim: Number of pixels P.
        total_count: L, the largest intensity (16 for scikit-learn's digits, 255 for 8-bit
            images); by default the data's number of levels.
    """

    pixels = "count"

    def __init__(self, data_dim: int, total_count: int | None = None) -> None:
        super().__init__(data_dim)
        if total_count is None:
            raise ValueError("likelihood 'binomial' needs total_count (the largest intensity L)")
        self.total_count = check_positive_int("total_count", total_count)

    @classmethod
    def options_for_data(cls, options: dict[str, Any], train: Tensor, levels: int | None) -> dict:
        if options.get("total_count") is None:
            options = {**options, "total_count": levels or max(1, int(train.max()))}
        return dict(options)

    def forward(self, out: Tensor) -> dist.Distribution:
        return dist.Binomial(total_count=self.total_count, logits=out)

    def mean(self, out: Tensor) -> Tensor:
        return self.total_count * torch.sigmoid(out)

    def value_range(self) -> tuple[float, float]:
        return (0.0, float(self.total_count))


@register_likelihood("gaussian")
class GaussianLikelihood(Likelihood):
    r"""Real values: :math:`x_p \sim \mathcal{N}(f_p(z), s_p^2)`.

    Args:
        data_dim: Number of pixels P.
        scale: ``decoded`` (default: the decoder outputs a scale per pixel and image,
            ``outputs_per_pixel`` = 2), ``learned`` (one free scale per pixel, the same for
            every image), or a positive number (fixed). On digits and on a standardized
            real-valued table ``decoded`` gave the best log-likelihood.
        min_scale: Floor of learned and decoded scales, so pixels that never vary (an image's
            border) cannot drive the density to infinity.
        init_scale: Starting value of a learned scale.
    """

    pixels = "real"
    discrete = False

    def __init__(
        self,
        data_dim: int,
        scale: str | float = "decoded",
        min_scale: float = 1e-2,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(data_dim)
        for name, value in (("min_scale", min_scale), ("init_scale", init_scale)):
            if not _positive_number(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if scale not in ("learned", "decoded") and not _positive_number(scale):
            raise ValueError(
                f"scale must be 'learned', 'decoded' or a positive number, got {scale!r}"
            )
        if init_scale <= min_scale:
            raise ValueError(f"init_scale ({init_scale}) must exceed min_scale ({min_scale})")
        self.scale_mode, self.min_scale = scale, float(min_scale)
        if scale == "learned":  # softplus(raw) + min_scale = init_scale at the start
            raw = math.log(math.expm1(init_scale - min_scale))
            self.raw_scale = nn.Parameter(torch.full((data_dim,), raw))

    @property
    def outputs_per_pixel(self) -> int:
        return 2 if self.scale_mode == "decoded" else 1

    def scale(self, out: Tensor) -> Tensor:
        """Per-pixel standard deviation, broadcastable to ``(*, P)``."""
        if self.scale_mode == "decoded":
            return F.softplus(out[..., self.data_dim :]) + self.min_scale
        if self.scale_mode == "learned":
            return F.softplus(self.raw_scale) + self.min_scale
        return out.new_tensor(float(self.scale_mode))

    def forward(self, out: Tensor) -> dist.Distribution:
        loc = out[..., : self.data_dim]
        return dist.Normal(loc, self.scale(out).expand(loc.shape))

    def mean(self, out: Tensor) -> Tensor:
        return out[..., : self.data_dim]

    def value_range(self) -> None:
        return None


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def make_likelihood(key: str, data_dim: int, **options: Any) -> Likelihood:
    """Build the likelihood registered under ``key``; ``options`` go to its constructor."""
    check_key(LIKELIHOODS, "likelihood", key)
    try:
        return LIKELIHOODS[key](data_dim, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options!r} for likelihood {key!r}: {error}") from None
