"""Priors p(z): the PRIORS registry, standard normal, learnable Gaussian mixture, VampPrior."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from .distributions import DiagonalNormalMixture, StandardNormal
from .guides import MIN_SCALE
from .sphere import HypersphericalUniform
from .validation import check_key, check_positive_int, registrar

__all__ = [
    "LATENTS",
    "PRIORS",
    "GaussianMixturePrior",
    "LatentPrior",
    "StandardNormalPrior",
    "VampPrior",
    "fixed_priors",
    "make_prior",
    "register_prior",
]

#: Latent spaces: ``euclidean`` (R^D) or ``sphere`` (the unit sphere S^{D-1} in R^D).
LATENTS = ("euclidean", "sphere")

#: Registry of priors p(z), key -> class; the CLI's ``--prior`` choices read it.
PRIORS: dict[str, type[LatentPrior]] = {}


#: ``@register_prior("key")``: class decorator adding a prior to ``PRIORS``.
register_prior = registrar(PRIORS, "prior")


class LatentPrior(nn.Module):
    """A prior module: ``forward()`` returns p(z) with batch shape ``()``, event ``(D,)``.

    Constructors take ``(latent_dim, encoder)`` first; further arguments have defaults.
    ``encoder`` is the VAE's guide network (only the VampPrior uses it). The class attribute
    ``latents`` declares the latent spaces a prior supports; a prior supporting more than
    ``euclidean`` takes the space as its ``latent`` argument.
    """

    key: str = ""
    latents: tuple[str, ...] = ("euclidean",)

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        self.latent_dim = latent_dim

    def forward(self) -> Distribution:
        raise NotImplementedError

    @contextmanager
    def fixed(self) -> Iterator[None]:
        """A block in which the parameters do not change (an evaluation): a prior may then
        build its distribution once for every call without gradients. Nothing here."""
        yield


@contextmanager
def fixed_priors(module: nn.Module) -> Iterator[None]:
    """Enter :meth:`LatentPrior.fixed` of every prior in ``module`` for the block; the
    caller promises not to change a parameter inside it."""
    with ExitStack() as stack:
        for part in module.modules():
            if isinstance(part, LatentPrior):
                stack.enter_context(part.fixed())
        yield


def make_prior(
    key: str,
    latent_dim: int,
    encoder: nn.Module | None = None,
    latent: str = "euclidean",
    **options: Any,
) -> LatentPrior:
    """Build the prior registered under ``key`` for the latent space ``latent``."""
    if latent not in LATENTS:
        raise ValueError(f"unknown latent {latent!r}; choose one of {', '.join(LATENTS)}")
    check_key(PRIORS, "prior", key)
    cls = PRIORS[key]
    if latent not in cls.latents:
        raise ValueError(
            f"prior {key!r} and latent {latent!r} do not fit: the prior supports latent "
            f"{', '.join(repr(space) for space in cls.latents)}"
        )
    if len(cls.latents) > 1:
        options = {**options, "latent": latent}
    try:
        return cls(latent_dim, encoder, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options!r} for prior {key!r}: {error}") from None


@register_prior("standard")
class StandardNormalPrior(LatentPrior):
    """p(z) = N(0, I) on R^D, or uniform on the unit sphere S^{D-1} for ``latent="sphere"``.

    Held in (non-persistent) buffers so it follows ``.to(device)``.
    """

    latents = ("euclidean", "sphere")

    def __init__(
        self, latent_dim: int, encoder: nn.Module | None = None, latent: str = "euclidean"
    ) -> None:
        super().__init__(latent_dim)
        if latent == "sphere" and latent_dim < 2:
            raise ValueError(f"latent 'sphere' needs latent_dim >= 2, got {latent_dim}")
        self.latent = latent
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(latent_dim), persistent=False)

    def forward(self) -> Distribution:
        if self.latent == "sphere":
            return HypersphericalUniform(self.latent_dim, like=self.loc)
        return StandardNormal(self.loc, self.scale).to_event(1)


@register_prior("mixture")
class GaussianMixturePrior(LatentPrior):
    r"""Learnable mixture of diagonal Gaussians.

    .. math:: p(z) = \sum_{k=1}^{K} \pi_k \mathcal{N}(z; m_k, \operatorname{diag} s_k^2)

    Args:
        latent_dim: Latent size D.
        encoder: Unused.
        num_components: K >= 1.
        init_scale: Spread of the initial means m_k ~ N(0, init_scale^2); scales start at 1.
    """

    def __init__(
        self,
        latent_dim: int,
        encoder: nn.Module | None = None,
        num_components: int = 10,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(latent_dim)
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive integer, got {num_components!r}")
        self.locs = nn.Parameter(init_scale * torch.randn(num_components, latent_dim))
        # softplus(0.5413) = 1: the components start with unit scale
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self) -> Distribution:
        scales = F.softplus(self.raw_scales) + MIN_SCALE  # (K, D)
        return DiagonalNormalMixture(self.locs, scales, self.logits)


@register_prior("vamp")
class VampPrior(LatentPrior):
    r"""Variational mixture of posteriors: the encoder's Gaussian at K learnable pseudo-inputs.

    .. math:: p(z) = \frac{1}{K} \sum_{k=1}^{K} q_0(z | u_k), \quad u_k = \sigma(a_k) \in (0, 1)^P

    q_0 is the diagonal Gaussian head of the encoder (``encoder.loc_scale``), which every
    guide family has, so the prior's density is exact for flows too. The encoder is shared
    with the guide but not registered as a submodule here (its parameters belong to the VAE's
    ``encoder`` and must not be counted twice).

    References:
        VAE with a VampPrior (Tomczak & Welling, 2018)

    Args:
        latent_dim: Latent size D.
        encoder: The VAE's guide network; needs ``data_dim`` and ``loc_scale(x)``.
        num_components: Number of pseudo-inputs K.
        init_logit_scale: Spread of the initial pseudo-input logits a_k ~ N(0, s^2).
    """

    def __init__(
        self,
        latent_dim: int,
        encoder: nn.Module | None = None,
        num_components: int = 100,
        init_logit_scale: float = 0.1,
    ) -> None:
        super().__init__(latent_dim)
        if encoder is None or not hasattr(encoder, "loc_scale"):
            raise ValueError(
                "the vamp prior needs an encoder with loc_scale(x) (an AmortizedGuide), "
                f"got {type(encoder).__name__}"
            )
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive integer, got {num_components!r}")
        self._encoder = (encoder,)  # a tuple hides it from nn.Module registration
        self.pseudo_logits = nn.Parameter(
            init_logit_scale * torch.randn(num_components, encoder.data_dim)
        )
        self._fixed = False  # inside fixed(): gradient-free calls share one mixture
        self._held: Distribution | None = None

    @property
    def pseudo_inputs(self) -> Tensor:
        """The pseudo-inputs u ``(K, P)`` in (0, 1)."""
        return torch.sigmoid(self.pseudo_logits)

    def forward(self) -> Distribution:
        """The mixture; inside :meth:`fixed`, calls without gradients share one, so an
        evaluation's many particle chunks encode the pseudo-inputs once."""
        if not self._fixed or torch.is_grad_enabled() or torch.jit.is_tracing():
            return self._mixture()
        if self._held is None:
            self._held = self._mixture()
        return self._held

    @contextmanager
    def fixed(self) -> Iterator[None]:
        """Share one mixture among the gradient-free calls of the block (the parameters must
        not change in it: a fused optimizer step, for one, leaves no trace to detect). Nested
        blocks keep the outermost's mixture; leaving the outermost drops it."""
        if self._fixed:
            yield
            return
        self._fixed = True
        try:
            yield
        finally:
            self._fixed, self._held = False, None

    def _mixture(self) -> Distribution:
        locs, scales, _ = self._encoder[0].loc_scale(self.pseudo_inputs)  # (K, D) each
        return DiagonalNormalMixture(locs, scales, locs.new_zeros(locs.shape[:1]))
