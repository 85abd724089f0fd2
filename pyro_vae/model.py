"""VAEConfig and VAE: the generative model p(x, z) = p(z) p(x|z) and its amortized guide."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import Tensor, nn

from .guides import GUIDES, make_guide
from .networks import (
    ConvDecoder,
    ConvEncoder,
    Decoder,
    GatedMLP,
    check_hidden_dims,
)
from .priors import LATENTS, PRIORS, make_prior
from .sphere import VonMisesFisher
from .validation import check_positive_int

__all__ = ["ARCHS", "MAX_LATENT_DIM", "VAE", "VAEConfig"]

MAX_LATENT_DIM = 1024

#: Built-in network pairs: ``mlp`` and ``gated`` (any image), ``conv`` (28x28 images only).
ARCHS = ("mlp", "gated", "conv")


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
        arch: ``mlp`` (softplus layers); ``gated`` (gated linear layers of the same widths,
            see :class:`~pyro_vae.networks.GatedDense`); or ``conv`` for 28x28 images (conv
            trunk of width ``hidden_dims[-1]`` and a transposed-conv decoder).
        prior: Key of ``PRIORS`` (``standard``, ``mixture``, ``vamp``).
        prior_options: Extra constructor arguments of the prior (e.g. ``num_components``).
        latent: ``euclidean`` (z in R^D) or ``sphere`` (z on S^{D-1}, uniform prior, only with
            guide ``vmf``); None picks ``sphere`` for guide ``vmf``, else ``euclidean``.
    """

    data_dim: int
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = (200,)
    guide: str = "full"
    guide_options: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, int] | None = None
    arch: str = "mlp"
    prior: str = "standard"
    prior_options: dict[str, Any] = field(default_factory=dict)
    latent: str | None = None

    def __post_init__(self) -> None:
        for name in ("data_dim", "latent_dim"):
            value = getattr(self, name)
            check_positive_int(name, value)
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
        object.__setattr__(self, "prior_options", dict(self.prior_options))
        if self.latent is None:
            object.__setattr__(self, "latent", "sphere" if self.guide == "vmf" else "euclidean")
        self._check_choices()

    def _check_choices(self) -> None:
        for name, choices in (("arch", ARCHS), ("prior", PRIORS), ("latent", LATENTS)):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of "
                    f"{', '.join(sorted(choices))}"
                )
        if self.arch == "conv" and self.image_shape != (28, 28):
            raise ValueError(f"arch 'conv' needs 28x28 images, got image_shape {self.image_shape}")
        if (self.latent == "sphere") != (self.guide == "vmf"):
            raise ValueError(
                f"guide 'vmf' and latent 'sphere' go together, got guide {self.guide!r} "
                f"with latent {self.latent!r}"
            )
        if self.latent == "sphere" and (self.prior != "standard" or self.prior_options):
            raise ValueError(
                f"latent 'sphere' has the uniform prior ('standard'), got prior {self.prior!r}"
            )
        if self.latent == "sphere" and self.latent_dim < 2:
            raise ValueError(f"latent 'sphere' needs latent_dim >= 2, got {self.latent_dim}")

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
    r"""Variational autoencoder with a swappable amortized guide and prior.

    .. math:: p(x, z) = p(z) \prod_p \mathrm{Bernoulli}(x_p; \sigma(f(z))_p)

    ``model`` and ``guide`` share one signature. Sites: ``f"{name}.z"`` (latent, event dim 1),
    ``f"{name}.x"`` (observed pixels, event dim 1), both in the plate ``f"{name}.data"`` (dim -1).
    x may carry leading dims ``(*, B, P)`` for outer plates at dims -2, -3, ...; then z is
    ``(*, B, D)``.

    Args:
        config: Sizes, networks, guide family and prior.
        name: Prefix of every Pyro site, plate and parameter, so two VAEs can share a program.
        encoder: A custom guide network replacing the configured one: ``forward(x)`` maps
            ``(*, B, P)`` to a distribution with batch ``(*, B)`` and event ``(D,)``.
        decoder: A custom decoder: Bernoulli logits ``(*, P)`` for z ``(*, D)``.
        trunk: A custom encoder trunk ``(*, P) -> (*, C)`` for the configured guide family
            (C = ``trunk.out_dim``); ignored when ``encoder`` is given.

    Checkpoints store the config and weights only: a VAE with custom networks is rebuilt by
    constructing it the same way and calling ``load_state_dict``.
    """

    def __init__(
        self,
        config: VAEConfig,
        name: str = "vae",
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        trunk: nn.Module | None = None,
    ) -> None:
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        if not name or not isinstance(name, str):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        super().__init__(name)
        for role, module in (("encoder", encoder), ("decoder", decoder), ("trunk", trunk)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{role} must be an nn.Module, got {type(module).__name__}")
        self.config, self.prefix = config, name
        conv = config.arch == "conv"
        gated = config.arch == "gated"
        if trunk is None and conv:
            trunk = ConvEncoder(config.hidden_dims[-1], image_shape=config.image_shape)
        if trunk is None and gated:
            trunk = GatedMLP(config.data_dim, config.hidden_dims)
        if encoder is None:
            encoder = make_guide(
                config.guide,
                config.data_dim,
                config.latent_dim,
                config.hidden_dims,
                trunk=trunk,
                **config.guide_options,
            )
        self.encoder = encoder
        if decoder is None and conv:
            decoder = ConvDecoder(config.latent_dim, config.hidden_dims[-1])
        if decoder is None:
            decoder = Decoder(
                config.latent_dim,
                tuple(reversed(config.hidden_dims)),
                config.data_dim,
                gated=gated,
            )
        self.decoder = decoder
        self.latent_prior = make_prior(
            config.prior,
            config.latent_dim,
            self.encoder,
            latent=config.latent,
            **config.prior_options,
        )
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))
        self._param_statements = True

    @contextmanager
    def without_param_statements(self) -> Iterator[VAE]:
        """Inside, ``model`` and ``guide`` call the networks without ``pyro.param`` statements.

        For loops that optimize ``vae.parameters()`` with a torch optimizer (as ``fit`` does):
        the traces then hold only sample sites, which spares registering every parameter in
        the param store on every step. Pyro's ``SVI`` and ``JitTrace_ELBO`` find parameters
        through those statements and must run outside.
        """
        before, self._param_statements = self._param_statements, False
        try:
            yield self
        finally:
            self._param_statements = before

    def _network(self, name: str) -> nn.Module:
        """The submodule ``name``, through a ``pyro.module`` statement unless switched off."""
        return getattr(self, name) if self._param_statements else self._modules[name]

    def _plate(
        self,
        x: Tensor | None,
        batch_size: int | None,
        num_data: int | None,
        subsample: Tensor | None,
    ) -> pyro.plate:
        """The data plate: size num_data (default: the batch) with the batch as subsample."""
        if x is not None and x.dim() < 2:
            raise ValueError(f"x must have shape (*, B, P), got {tuple(x.shape)}")
        n = batch_size if x is None else x.shape[-2]
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
        """p(z) from ``config.prior``: batch shape ``()``, event shape ``(D,)``."""
        return self._network("latent_prior")()

    @pyro_method
    def model(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
        prior: dist.Distribution | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """p(z) p(x|z) for x ``(*, B, P)`` (or ``batch_size`` fresh images); returns x.

        ``num_data`` sizes the plate to the whole dataset so the minibatch ELBO is scaled by
        N / B; ``subsample`` gives the batch's indices in it (default ``arange(B)``).
        ``prior`` replaces p(z) for this call (event ``(D,)``, batch broadcastable to the
        plates), e.g. N(c_g, s^2 I) from a group latent of an outer model. ``mask``
        ``(*, B, P)`` (bool) keeps only the log-likelihood of the pixels where it is True.
        """
        with self._plate(x, batch_size, num_data, subsample):
            z = pyro.sample(f"{self.prefix}.z", self.prior() if prior is None else prior)
            likelihood = dist.Bernoulli(logits=self._network("decoder")(z))
            if mask is not None:
                likelihood = likelihood.mask(mask)
            return pyro.sample(f"{self.prefix}.x", likelihood.to_event(1), obs=x)

    @pyro_method
    def guide(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
        prior: dist.Distribution | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """q(z|x) for x ``(*, B, P)``; returns z ``(*, B, D)``.

        ``prior`` and ``mask`` are ignored: they are accepted so that SVI can pass the
        model's arguments unchanged.
        """
        if x is None:
            raise ValueError("the guide needs the observed images x")
        with self._plate(x, batch_size, num_data, subsample):
            return pyro.sample(f"{self.prefix}.z", self._network("encoder")(x))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities ``(*, P)`` for latents ``(*, D)``."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample_images(self, num_images: int, generator: torch.Generator | None = None) -> Tensor:
        """Pixel probabilities ``(n, P)`` of images decoded from prior samples."""
        device = self.prior_loc.device
        seed = int(torch.randint(2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # local to this block: the global RNG state is restored
            z = self.prior().sample((num_images,))
        return self.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities ``(B, P)`` decoded from the mean of q(z|x) (a sample for flows)."""
        posterior = self.encoder(x)
        if isinstance(posterior, VonMisesFisher):
            return self.decode(posterior.loc)  # the mode; the mean lies inside the sphere
        try:
            z = posterior.mean
        except NotImplementedError:  # flows have no closed-form mean: use one sample
            z = posterior.sample()
        return self.decode(z)
