"""VAEConfig and VAE: the generative model p(x, z) = p(z) p(x|z) and its amortized guide."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import Tensor

from .guides import GUIDES, make_guide
from .networks import Decoder, check_hidden_dims

__all__ = ["MAX_LATENT_DIM", "VAE", "VAEConfig"]

MAX_LATENT_DIM = 1024


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a VAE; stored in checkpoints and ``config.json``.

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Encoder trunk widths; the decoder uses them reversed.
        guide: Key of ``GUIDES``.
        guide_options: Extra constructor arguments of the guide (e.g. ``num_flows``).
        image_shape: (height, width) for pictures; ``(1, P)`` when unknown.
    """

    data_dim: int
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = (200,)
    guide: str = "full"
    guide_options: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("data_dim", "latent_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.latent_dim > MAX_LATENT_DIM:
            raise ValueError(f"latent_dim must be <= {MAX_LATENT_DIM}, got {self.latent_dim}")
        object.__setattr__(self, "hidden_dims", check_hidden_dims(self.hidden_dims))
        if self.guide not in GUIDES:
            raise ValueError(
                f"unknown guide {self.guide!r}; choose one of {', '.join(sorted(GUIDES))}"
            )
        shape = self.image_shape or (1, self.data_dim)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or shape[0] * shape[1] != self.data_dim:
            raise ValueError(
                f"image_shape {self.image_shape!r} does not hold {self.data_dim} pixels"
            )
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "guide_options", dict(self.guide_options))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists instead of tuples)."""
        out = asdict(self)
        out["hidden_dims"] = list(self.hidden_dims)
        out["image_shape"] = list(self.image_shape)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = set(cls.__dataclass_fields__)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown VAEConfig fields {sorted(unknown)}")
        values = dict(values)
        for key in ("hidden_dims", "image_shape"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


class VAE(PyroModule):
    r"""Variational autoencoder with a swappable amortized guide.

    .. math:: p(x, z) = \mathcal{N}(z; 0, I) \prod_p \mathrm{Bernoulli}(x_p; \sigma(f(z))_p)

    ``model`` and ``guide`` share one signature. Sites: ``f"{name}.z"`` (latent, event dim 1),
    ``f"{name}.x"`` (observed pixels, event dim 1), both in the plate ``f"{name}.data"`` (dim -1).

    Args:
        config: Sizes and guide family.
        name: Prefix of every Pyro site, plate and parameter, so two VAEs can share a program.
    """

    def __init__(self, config: VAEConfig, name: str = "vae") -> None:
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        if not name or not isinstance(name, str):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        super().__init__(name)
        self.config, self.prefix = config, name
        self.encoder = make_guide(
            config.guide,
            config.data_dim,
            config.latent_dim,
            config.hidden_dims,
            **config.guide_options,
        )
        self.decoder = Decoder(
            config.latent_dim, tuple(reversed(config.hidden_dims)), config.data_dim
        )
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))

    def _plate(
        self,
        x: Tensor | None,
        batch_size: int | None,
        num_data: int | None,
        subsample: Tensor | None,
    ) -> pyro.plate:
        """The data plate: size num_data (default: the batch) with the batch as subsample."""
        n = batch_size if x is None else x.shape[0]
        if n is None:
            raise ValueError("pass x or batch_size")
        if num_data is None or num_data == n and subsample is None:
            return pyro.plate(f"{self.prefix}.data", n, dim=-1)
        if num_data < n:
            raise ValueError(f"num_data ({num_data}) is smaller than the batch ({n})")
        if subsample is None:
            subsample = torch.arange(n, device=self.prior_loc.device)
        return pyro.plate(f"{self.prefix}.data", num_data, subsample=subsample, dim=-1)

    def prior(self) -> dist.Distribution:
        """p(z): batch shape ``()``, event shape ``(D,)``."""
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    @pyro_method
    def model(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
    ) -> Tensor:
        """p(z) p(x|z) for x ``(B, P)`` (or ``batch_size`` fresh images); returns x ``(B, P)``.

        ``num_data`` sizes the plate to the whole dataset so the minibatch ELBO is scaled by
        N / B; ``subsample`` gives the batch's indices in it (default ``arange(B)``).
        """
        with self._plate(x, batch_size, num_data, subsample):
            z = pyro.sample(f"{self.prefix}.z", self.prior())
            likelihood = dist.Bernoulli(logits=self.decoder(z))
            return pyro.sample(f"{self.prefix}.x", likelihood.to_event(1), obs=x)

    @pyro_method
    def guide(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
    ) -> Tensor:
        """q(z|x) for x ``(B, P)``; returns z ``(B, D)``."""
        if x is None:
            raise ValueError("the guide needs the observed images x")
        with self._plate(x, batch_size, num_data, subsample):
            return pyro.sample(f"{self.prefix}.z", self.encoder(x))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities ``(*, P)`` for latents ``(*, D)``."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample_images(self, num_images: int, generator: torch.Generator | None = None) -> Tensor:
        """Pixel probabilities ``(n, P)`` of images decoded from prior samples."""
        eps = torch.randn(num_images, self.config.latent_dim, generator=generator)
        return self.decode(self.prior_loc + self.prior_scale * eps.to(self.prior_loc))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities ``(B, P)`` decoded from the mean of q(z|x) (a sample for flows)."""
        posterior = self.encoder(x)
        try:
            z = posterior.mean
        except NotImplementedError:  # flows have no closed-form mean: use one sample
            z = posterior.sample()
        return self.decode(z)
