"""VAEConfig and VAE: the generative model p(x, z) = p(z) p(x|z) and its amortized guide."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from pyro.poutine.runtime import get_plates
from torch import Tensor, nn

from .guides import GUIDES, make_guide
from .hierarchy import (
    DECODER_INPUTS,
    INFERENCES,
    BottomUpPosterior,
    GaussianLayer,
    LadderPosterior,
    TopDownPosterior,
    join,
    merge_gaussians,
)
from .likelihoods import LIKELIHOODS, make_likelihood
from .networks import ARCHS, NetworkPair, check_hidden_dims, make_arch
from .priors import LATENTS, PRIORS, make_prior
from .sphere import VonMisesFisher
from .validation import check_images, check_key, check_memory, check_positive_int

__all__ = ["MAX_LATENT_DIM", "VAE", "ModelDraw", "VAEConfig"]

MAX_LATENT_DIM = 1024


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a VAE; stored in checkpoints and ``config.json``.

    One (key, options) pair per axis of the model: ``guide``, ``prior``, ``likelihood`` and
    ``arch``, each a key of its registry (``GUIDES``, ``PRIORS``, ``LIKELIHOODS``, ``ARCHS``)
    with the constructor arguments of that part. The parts declare what they support
    (latent space, image shape, conditioning); the config checks once that they fit.

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Encoder trunk widths; the decoder uses them reversed.
        guide: Key of ``GUIDES``.
        guide_options: Extra constructor arguments of the guide (e.g. ``num_flows``).
        image_shape: (height, width) for pictures; ``(1, P)`` when unknown.
        arch: Key of ``ARCHS``: ``mlp`` (softplus layers), ``gated`` (gated linear layers of
            the same widths, see :class:`~pyro_vae.networks.GatedDense`) or ``conv`` for 28x28
            images (conv trunk of width ``hidden_dims[-1]``, transposed-conv decoder).
        prior: Key of ``PRIORS`` (``standard``, ``mixture``, ``vamp``).
        prior_options: Extra constructor arguments of the prior (e.g. ``num_components``).
        latent: ``euclidean`` (z in R^D) or ``sphere`` (z on S^{D-1}); None takes the space
            the guide declares (``sphere`` for ``vmf``).
        likelihood: Key of ``LIKELIHOODS``: ``bernoulli`` (binary pixels),
            ``continuous-bernoulli`` (intensities in [0, 1]), ``binomial`` (integers 0..L),
            ``gaussian`` (real values).
        likelihood_options: Extra constructor arguments of the likelihood (e.g.
            ``total_count`` of ``binomial``, ``scale`` of ``gaussian``).
        arch_options: Extra constructor arguments of the network pair (e.g. conv
            ``channels``).
        condition_dim: Width C of a conditioning vector (e.g. a one-hot label) fed to encoder
            and decoder; 0 for an unconditional VAE.
        latent_dims: Sizes of L stochastic layers from z_1 (next to x) to z_L (the top, under
            ``prior``): p(z_L) p(z_{L-1} | z_L) ... p(x | z_1) with Gaussian layers. None: one
            layer of ``latent_dim``; given, ``latent_dim`` is ``latent_dims[0]``.
        inference: How an L-layer posterior is built: ``bottom-up``, q(z_1|x) q(z_2|z_1, x)
            ..., or ``top-down``, q(z_L|x) q(z_{L-1}|z_L, x) ... (the VampPrior paper's HVAE),
            each layer a guide of ``layer_guides``; or ``ladder``, the bottom-up pass merged
            with the generative top-down pass (Sonderby et al. 2016; diagonal only).
        layer_guides: Guide key of each layer (bottom-up or top-down); None: ``guide`` for
            every layer. ``guide_options`` go to the layers whose key is ``guide``.
        decoder_input: What p(x | .) reads: ``z1`` (the layer next to x) or ``all`` (every
            layer, concatenated [z_1, ..., z_L], as the VampPrior paper's HVAE).
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
    likelihood: str = "bernoulli"
    likelihood_options: dict[str, Any] = field(default_factory=dict)
    arch_options: dict[str, Any] = field(default_factory=dict)
    condition_dim: int = 0
    latent_dims: tuple[int, ...] | None = None
    inference: str = "bottom-up"
    layer_guides: tuple[str, ...] | None = None
    decoder_input: str = "z1"

    def __post_init__(self) -> None:
        self._normalize_layers()
        check_positive_int("data_dim", self.data_dim)
        condition = self.condition_dim
        if isinstance(condition, bool) or not isinstance(condition, int) or condition < 0:
            raise ValueError(f"condition_dim must be an integer >= 0, got {condition!r}")
        object.__setattr__(self, "hidden_dims", check_hidden_dims(self.hidden_dims))
        shape = self.image_shape or (1, self.data_dim)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or shape[0] * shape[1] != self.data_dim:
            raise ValueError(
                f"image_shape {self.image_shape!r} does not hold {self.data_dim} pixels"
            )
        object.__setattr__(self, "image_shape", shape)
        for name in ("guide", "prior", "likelihood", "arch"):
            options = getattr(self, f"{name}_options")
            if not isinstance(options, dict):
                raise ValueError(f"{name}_options must be a dict, got {options!r}")
            object.__setattr__(self, f"{name}_options", dict(options))
        check_key(GUIDES, "guide", self.guide)
        if self.latent is None:
            object.__setattr__(self, "latent", GUIDES[self.guide].latent)
        self._check_parts()
        sizes = [f"hidden_dims {list(self.hidden_dims)}", f"latent_dims {list(self.latent_dims)}"]
        options = {**self.guide_options, **self.prior_options}
        counts = [key for key in ("num_flows", "num_components") if key in options]
        sizes += [f"{key} {options[key]}" for key in counts]
        check_memory(  # weights, gradients and Adam's two moments: 16 bytes a parameter
            f"this model ({', '.join(sizes)}) with its training state",
            16 * self.estimated_parameters(),
        )

    def _normalize_layers(self) -> None:
        """latent_dims as a tuple (one layer: ``(latent_dim,)``), layer_guides one per layer."""
        sizes = (self.latent_dim,) if self.latent_dims is None else self.latent_dims
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (tuple, list)) or not sizes:
            raise ValueError(f"latent_dims must be one or more sizes, got {self.latent_dims!r}")
        name = "latent_dim" if self.latent_dims is None else "latent_dims"
        for size in sizes:
            check_positive_int(name, size)
            if size > MAX_LATENT_DIM:
                raise ValueError(f"{name} must be <= {MAX_LATENT_DIM}, got {size}")
        object.__setattr__(self, "latent_dims", tuple(sizes))
        object.__setattr__(self, "latent_dim", sizes[0])
        guides = self.layer_guides or (self.guide,) * len(sizes)
        if isinstance(guides, str) or len(guides) != len(sizes):
            raise ValueError(
                f"layer_guides must name one guide per layer ({len(sizes)}), got {guides!r}"
            )
        for key in guides:
            check_key(GUIDES, "guide", key)
        if len(sizes) == 1 and tuple(guides) != (self.guide,):
            raise ValueError(f"a one-layer model takes its guide from guide, got {guides!r}")
        object.__setattr__(self, "layer_guides", tuple(guides))
        check_key(dict.fromkeys(INFERENCES), "inference", self.inference)
        check_key(dict.fromkeys(DECODER_INPUTS), "decoder_input", self.decoder_input)

    @property
    def code_dim(self) -> int:
        """Width of the latent code the decoder reads: D_1, or D_1 + ... + D_L (``all``)."""
        return sum(self.latent_dims) if self.decoder_input == "all" else self.latent_dim

    def _check_layers(self) -> None:
        """An L-layer model: Euclidean layers; a ladder posterior only of diagonal Gaussians."""
        if len(self.latent_dims) == 1:
            return
        for key in self.layer_guides:
            if GUIDES[key].latent != "euclidean":
                raise ValueError(
                    f"guide {key!r} and latent_dims {list(self.latent_dims)} do not fit: the "
                    "layers of a hierarchy are Euclidean"
                )
        other = [key for key in (self.guide, *self.layer_guides) if key != "diagonal"]
        if self.inference == "ladder" and other:
            raise ValueError(
                f"inference 'ladder' and guide {other[0]!r} do not fit: the ladder posterior "
                "merges diagonal Gaussians (use guide 'diagonal' or inference 'bottom-up')"
            )

    def _check_parts(self) -> None:
        """Each key is registered and the parts fit together: one error naming both parts."""
        for name, table in (
            ("arch", ARCHS),
            ("prior", PRIORS),
            ("likelihood", LIKELIHOODS),
            ("latent", dict.fromkeys(LATENTS)),
        ):
            check_key(table, name, getattr(self, name))
        guide_latent = GUIDES[self.guide].latent
        if self.latent != guide_latent:
            raise ValueError(
                f"guide {self.guide!r} and latent {self.latent!r} do not fit: the guide draws "
                f"z in latent {guide_latent!r}"
            )
        prior = PRIORS[self.prior]
        if self.latent not in prior.latents:
            raise ValueError(
                f"prior {self.prior!r} and latent {self.latent!r} do not fit: the prior "
                f"supports latent {', '.join(repr(space) for space in prior.latents)}"
            )
        if self.latent == "sphere" and self.latent_dim < 2:
            raise ValueError(f"latent 'sphere' needs latent_dim >= 2, got {self.latent_dim}")
        arch = ARCHS[self.arch]
        if arch.image_shape is not None and self.image_shape != arch.image_shape:
            raise ValueError(
                f"arch {self.arch!r} and image_shape {self.image_shape} do not fit: the arch "
                f"takes {arch.image_shape[0]}x{arch.image_shape[1]} images"
            )
        if self.condition_dim and not arch.conditional:
            raise ValueError(
                f"arch {self.arch!r} and condition_dim {self.condition_dim} do not fit: the "
                "arch takes no conditioning input"
            )
        self._check_layers()

    def estimated_parameters(self) -> int:
        """About how many parameters the configured networks, flows and prior hold.

        Counts the weight matrices of encoder and decoder trunks and heads of every layer
        (twice for gated layers), flow maps of ``num_flows`` and the prior's components; an
        estimate for size checks made before anything is allocated, not an exact count.
        """
        inputs, sizes, widths = (
            self.data_dim + self.condition_dim,
            self.latent_dims,
            self.hidden_dims,
        )
        gate = 2 if self.arch == "gated" else 1
        options = {**self.guide_options, **self.prior_options, **self.likelihood_options}

        def chain(first: int, middle: tuple[int, ...], last: int) -> int:
            dims = (first, *middle, last)
            return sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))

        total = 0
        for index, size in enumerate(sizes):
            below = sizes[index - 1] if index else 0
            neighbour = max(below, sizes[index + 1] if index + 1 < len(sizes) else 0)
            total += gate * chain(inputs + neighbour, widths, 3 * size)  # trunk and heads
            if index:
                total += gate * chain(size, widths[::-1], 2 * below)  # p(z_l | z_{l+1})
        total += gate * chain(self.code_dim + self.condition_dim, widths[::-1], 2 * self.data_dim)
        flows = options.get("num_flows", 0)
        if isinstance(flows, int) and flows > 0:
            total += flows * 3 * (10 * sizes[0]) * (sizes[0] + widths[-1])
        components = options.get("num_components", 0)
        if isinstance(components, int) and components > 0:
            total += components * (self.data_dim + 2 * sizes[-1])
        return total

    def check_data(self, x: Tensor, pixels: str | None = None, where: str = "data") -> None:
        """ValueError (one line) unless images x ``(N, P)`` (of pixel kind ``pixels``) fit.

        Checks the pixel count, the likelihood's pixel kind and its support.
        """
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(
                f"{where}: images must have shape (N, {self.data_dim}), got {tuple(x.shape)}"
            )
        kind = LIKELIHOODS[self.likelihood].pixels
        if pixels is not None and pixels != kind:
            raise ValueError(
                f"likelihood {self.likelihood!r} and {where} do not fit: the likelihood scores "
                f"{kind} pixels, the data hold {pixels} pixels"
            )
        make_likelihood(self.likelihood, self.data_dim, **self.likelihood_options).check_data(
            x, where
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists instead of tuples)."""
        out = asdict(self)
        for key in ("hidden_dims", "image_shape", "latent_dims", "layer_guides"):
            out[key] = list(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(values, dict):
            raise ValueError(f"a VAEConfig is a dict of fields, got {type(values).__name__}")
        names = set(cls.__dataclass_fields__)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown VAEConfig fields {sorted(unknown)}")
        values = dict(values)
        for key in ("hidden_dims", "image_shape", "latent_dims", "layer_guides"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


class ModelDraw(NamedTuple):
    """What :meth:`VAE.model` returns: latents z ``(*, B, D)`` and images x ``(*, B, P)``."""

    z: Tensor
    x: Tensor


class VAE(PyroModule):
    r"""Variational autoencoder assembled from registered parts.

    .. math:: p(x, z \mid c) = p(z) \prod_p p(x_p \mid f_p(z, c))

    with the prior p(z) from ``PRIORS``, the likelihood p(x_p | .) from ``LIKELIHOODS``, the
    decoder f from ``ARCHS`` and the guide q(z | x, c) from ``GUIDES``. c is an optional
    conditioning vector (``config.condition_dim`` > 0), concatenated to the input of the
    encoder and the decoder.

    ``model`` and ``guide`` share one signature. Sites: ``f"{name}.z"`` (latent, event dim 1),
    ``f"{name}.x"`` (observed pixels, event dim 1), both in the plate ``f"{name}.data"`` (dim
    -1). A program that opens that plate itself (``with vae.plate(x): ...``) can put its own
    sites in it; ``model`` and ``guide`` called inside reuse it. x may carry leading dims
    ``(*, B, P)`` for outer plates at dims -2, -3, ...; then z is ``(*, B, D)``.

    Args:
        config: Sizes and the part of each axis.
        name: Prefix of every Pyro site, plate and parameter, so two VAEs can share a program.
        encoder: A custom guide network replacing the configured one: ``forward(x)`` maps
            ``(*, B, P + C)`` to a distribution with batch ``(*, B)`` and event ``(D,)``.
        decoder: A custom decoder: ``(*, D + C) -> (*, k P)``, the raw parameters of the
            likelihood (k = ``vae.likelihood.outputs_per_pixel``; Bernoulli logits for k = 1).
        trunk: A custom encoder trunk ``(*, P + C) -> (*, H)`` for the configured guide family
            (H = ``trunk.out_dim``); ignored when ``encoder`` is given.

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
        options = config.likelihood_options
        likelihood = make_likelihood(config.likelihood, config.data_dim, **options)
        arch = make_arch(config.arch, **config.arch_options)
        in_dim = config.data_dim + config.condition_dim
        if trunk is None:
            trunk = arch.trunk(in_dim, config.hidden_dims, config.image_shape)
        if encoder is None:
            encoder = self._make_encoder(arch, trunk, in_dim)
        self.encoder = encoder
        if decoder is None:
            decoder = arch.decoder(
                config.code_dim + config.condition_dim,
                tuple(reversed(config.hidden_dims)),
                likelihood.outputs_per_pixel * config.data_dim,
                config.image_shape,
            )
        self.decoder = decoder
        self.likelihood = likelihood
        sizes = config.latent_dims
        if len(sizes) > 1:  # transitions[i]: p(z_{i+1} | z_{i+2}), sites z1 .. zL
            self.transitions = nn.ModuleList(
                GaussianLayer(above, config.hidden_dims, size, self._open_trunk(arch, above))
                for size, above in zip(sizes[:-1], sizes[1:], strict=True)
            )
        self.latent_sites = (
            (f"{name}.z",)
            if len(sizes) == 1
            else tuple(f"{name}.z{i + 1}" for i in range(len(sizes)))
        )
        self.latent_prior = make_prior(
            config.prior,
            sizes[-1],
            self.encoder,
            latent=config.latent,
            **config.prior_options,
        )
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))
        self._param_statements = True

    def _open_trunk(self, arch: NetworkPair, in_dim: int) -> nn.Module | None:
        """The arch's trunk for an input of any width (None: the default MLP)."""
        if not arch.conditional:  # a fixed-input trunk (conv) takes only images
            return None
        return arch.trunk(in_dim, self.config.hidden_dims, self.config.image_shape)

    def _make_encoder(self, arch: NetworkPair, trunk: nn.Module | None, in_dim: int) -> nn.Module:
        """q(z|x): the configured guide, or the posterior of an L-layer model."""
        config = self.config
        sizes = config.latent_dims
        if len(sizes) > 1 and config.inference == "ladder":
            return LadderPosterior(in_dim, sizes, config.hidden_dims, trunk=trunk)
        top_down = config.inference == "top-down"
        first = len(sizes) - 1 if top_down else 0  # the layer that reads x alone
        layers = []
        for index, (key, size) in enumerate(zip(config.layer_guides, sizes, strict=True)):
            neighbour = index + 1 if top_down else index - 1
            width = in_dim if index == first else in_dim + sizes[neighbour]
            options = config.guide_options if key == config.guide else {}
            layer_trunk = trunk if index == first else self._open_trunk(arch, width)
            layers.append(
                make_guide(key, width, size, config.hidden_dims, trunk=layer_trunk, **options)
            )
        if len(sizes) == 1:
            return layers[0]
        return TopDownPosterior(layers) if top_down else BottomUpPosterior(layers)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> VAE:
        """The VAE of an exported folder (``pyro-vae export``) or a run folder, in eval mode."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, map_location)

    @property
    def traceable(self) -> bool:
        """Whether ``torch.jit.trace`` can compile this VAE's loss: no part of it (any
        submodule) sets ``traceable = False``."""
        parts = (module for module in self.modules() if module is not self)
        return all(getattr(module, "traceable", True) for module in parts)

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

    def plate(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
    ) -> pyro.plate:
        """The data plate ``f"{prefix}.data"`` at dim -1 for x ``(*, B, P)`` or ``batch_size``.

        Sized ``num_data`` (default: the batch) with the batch as subsample (default
        ``arange(B)``), so a minibatch estimates the full-data ELBO. Open it to add your own
        sites beside the VAE's: ``with vae.plate(x): y = pyro.sample(...); vae.model(x, ...)``.
        """
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

    def _data_plate(
        self,
        x: Tensor | None,
        batch_size: int | None,
        num_data: int | None,
        subsample: Tensor | None,
    ) -> pyro.plate | nullcontext:
        """The open data plate when the caller opened it, else a new one (:meth:`plate`)."""
        name = f"{self.prefix}.data"
        frame = next((f for f in get_plates() if f.name == name), None)
        if frame is None:
            return self.plate(x, batch_size, num_data, subsample)
        n = batch_size if x is None else x.shape[-2]
        if n is not None and n != frame.size:
            raise ValueError(f"the open plate {name!r} holds {frame.size} images, x has {n}")
        return nullcontext()

    def _check_condition(self, condition: Tensor | None) -> None:
        width = self.config.condition_dim
        if width and condition is None:
            raise ValueError(f"this VAE is conditional: pass condition of shape (*, B, {width})")
        if condition is not None and not isinstance(condition, Tensor):
            raise TypeError(f"condition must be a Tensor, got {type(condition).__name__}")
        if condition is not None and (not width or condition.shape[-1] != width):
            raise ValueError(
                f"condition must have shape (*, B, {width}) (config.condition_dim), "
                f"got {tuple(condition.shape)}"
            )

    def prior(self) -> dist.Distribution:
        """p(z) from ``config.prior``: batch shape ``()``, event shape ``(D,)``."""
        return self._network("latent_prior")()

    def likelihood_of(self, z: Tensor, condition: Tensor | None = None) -> dist.Distribution:
        """p(x | z, c): batch ``(*, P)`` for the code z ``(*, code_dim)`` (no event dim).

        The code is z_1, or [z_1, ..., z_L] with ``config.decoder_input == "all"``
        (:meth:`code_of`).
        """
        return self._network("likelihood")(self._network("decoder")(join(z, condition)))

    def code_of(self, layers: Sequence[Tensor]) -> Tensor:
        """The decoder's code ``(*, code_dim)`` from the layers [z_1, ..., z_L] ``(*, D_l)``."""
        if self.config.decoder_input == "z1" or len(layers) == 1:
            return layers[0]
        lead = torch.broadcast_shapes(*(z.shape[:-1] for z in layers))
        return torch.cat([z.expand(*lead, z.shape[-1]) for z in layers], -1)

    @pyro_method
    def model(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
        prior: dist.Distribution | None = None,
        mask: Tensor | None = None,
        condition: Tensor | None = None,
    ) -> ModelDraw:
        """p(z) p(x | z, c) for x ``(*, B, P)`` (or ``batch_size`` fresh images).

        ``num_data`` sizes the plate to the whole dataset so the minibatch ELBO is scaled by
        N / B; ``subsample`` gives the batch's indices in it (default ``arange(B)``).
        ``prior`` replaces p(z) for this call (event ``(D,)``, batch broadcastable to the
        plates), e.g. N(c_g, s^2 I) from a group latent of an outer model. ``mask``
        ``(*, B, P)`` (bool) keeps only the log-likelihood of the pixels where it is True.
        ``condition`` ``(*, B, C)`` is the conditioning vector of a conditional VAE (leading
        dims broadcast, e.g. an enumerated label).

        With several layers (``config.latent_dims``) the sites are ``f"{name}.z1"`` (next to
        x) to ``f"{name}.zL"``; ``prior`` then replaces p(z_L), and the decoder reads z_1 or
        all layers (``config.decoder_input``).

        Returns:
            ``ModelDraw(z, x)``: the latent next to x (z_1) and the observed or drawn images.
        """
        if x is not None:
            check_images("x", x, self.config.data_dim)
        self._check_condition(condition)
        sites = self.latent_sites
        with self._data_plate(x, batch_size, num_data, subsample):
            z = pyro.sample(sites[-1], self.prior() if prior is None else prior)
            layers = [z]
            if len(sites) > 1:
                transitions = self._network("transitions")
                for index in reversed(range(len(sites) - 1)):
                    z = pyro.sample(sites[index], transitions[index](z))
                    layers.insert(0, z)
            likelihood = self.likelihood_of(self.code_of(layers), condition)
            if mask is not None:
                likelihood = likelihood.mask(mask)
            x = pyro.sample(f"{self.prefix}.x", likelihood.to_event(1), obs=x)
        return ModelDraw(z, x)

    @pyro_method
    def guide(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        num_data: int | None = None,
        subsample: Tensor | None = None,
        prior: dist.Distribution | None = None,
        mask: Tensor | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        """q(z | x, c) for x ``(*, B, P)``; returns z ``(*, B, D)`` (z_1 with several layers).

        ``prior`` and ``mask`` are ignored: they are accepted so that SVI can pass the
        model's arguments unchanged.
        """
        if x is None:
            raise ValueError("the guide needs the observed images x")
        check_images("x", x, self.config.data_dim)
        self._check_condition(condition)
        encoder, sites, x_in = self._network("encoder"), self.latent_sites, join(x, condition)
        with self._data_plate(x, batch_size, num_data, subsample):
            if len(sites) == 1:
                return pyro.sample(sites[0], encoder(x_in))
            if isinstance(encoder, BottomUpPosterior):
                below = z1 = None
                for index, site in enumerate(sites):
                    below = pyro.sample(site, encoder.posterior(index, x_in, below))
                    z1 = below if index == 0 else z1
                return z1
            if isinstance(encoder, TopDownPosterior):
                above = None
                for index in reversed(range(len(sites))):
                    above = pyro.sample(sites[index], encoder.posterior(index, x_in, above))
                return above
            ups, transitions = encoder.bottom_up(x_in), self._network("transitions")
            z = pyro.sample(sites[-1], encoder.posterior(ups[-1], None))
            for index in reversed(range(len(sites) - 1)):
                prior_params = transitions[index].loc_scale(z)
                z = pyro.sample(sites[index], encoder.posterior(ups[index], prior_params))
            return z

    @torch.no_grad()
    def decode(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """E[x | z, c] ``(*, P)`` for codes ``(*, code_dim)`` (Bernoulli: pixel probabilities).

        The code is what :meth:`encode` returns: z_1, or [z_1, ..., z_L] when the decoder
        reads every layer.
        """
        check_images("z", z, self.config.code_dim, "the code width")
        self._check_condition(condition)
        return self.likelihood.mean(self.decoder(join(z, condition)))

    def class_cycle(self, num_images: int) -> Tensor | None:
        """One-hot classes 0, 1, ..., C-1, 0, ... ``(n, C)`` for a conditional VAE, else None."""
        width = self.config.condition_dim
        if not width:
            return None
        classes = torch.arange(num_images, device=self.prior_loc.device) % width
        return torch.nn.functional.one_hot(classes, width).float()

    @torch.no_grad()
    def sample_images(
        self,
        num_images: int,
        generator: torch.Generator | None = None,
        condition: Tensor | None = None,
        draw_pixels: bool = False,
    ) -> Tensor:
        """Means ``(n, P)`` of images decoded from prior samples (``condition`` ``(n, C)``).

        With ``draw_pixels``, images drawn from p(x | z) instead of its mean (binary images
        for the Bernoulli likelihood), from the same z.
        """
        if not isinstance(num_images, int) or isinstance(num_images, bool):
            raise TypeError(f"num_images must be an int, got {type(num_images).__name__}")
        if num_images < 0:
            raise ValueError(f"num_images must be an integer >= 0, got {num_images}")
        outputs = self.likelihood.outputs_per_pixel * self.config.data_dim
        check_memory(
            f"sample_images({num_images})",
            4 * num_images * (outputs + sum(self.config.hidden_dims) + self.config.code_dim),
        )
        device = self.prior_loc.device
        seed = int(torch.randint(2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # local to this block: the global RNG state is restored
            z = self.prior().sample((num_images,))
            layers = [z]
            for index in reversed(range(len(self.latent_sites) - 1)):
                z = self.transitions[index](z).sample()  # ancestral, from the top down
                layers.insert(0, z)
            z = self.code_of(layers)
            if draw_pixels:
                self._check_condition(condition)
                return self.likelihood_of(z, condition).sample()
        return self.decode(z, condition)

    @torch.no_grad()
    def encode(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """A point code ``(B, code_dim)`` of each image ``(B, P)``, what :meth:`decode` reads.

        The mean of q(z_1 | x, c) (one layer, or a decoder reading z_1); with a decoder reading
        every layer, [z_1, ..., z_L], each layer's posterior mean given the means of the
        layers it is conditioned on. The mode on the sphere (the vMF mean lies inside it) and
        one draw for flows (no closed form).
        """
        check_images("x", x, self.config.data_dim)
        self._check_condition(condition)
        x_in = join(x, condition)
        encoder = self.encoder
        if isinstance(encoder, LadderPosterior):  # top-down through the posterior means
            ups = encoder.bottom_up(x_in)
            layers = [ups[-1][0]]
            for index in reversed(range(len(ups) - 1)):
                prior_params = self.transitions[index].loc_scale(layers[0])
                layers.insert(0, merge_gaussians(*ups[index], *prior_params)[0])
        elif isinstance(encoder, TopDownPosterior):
            layers = [_point(encoder.posterior(len(encoder.layers) - 1, x_in, None))]
            for index in reversed(range(len(encoder.layers) - 1)):
                layers.insert(0, _point(encoder.posterior(index, x_in, layers[0])))
        elif isinstance(encoder, BottomUpPosterior):
            layers = []
            for index in range(len(encoder.layers)):
                below = layers[-1] if layers else None
                layers.append(_point(encoder.posterior(index, x_in, below)))
                if self.config.decoder_input == "z1":
                    break
        else:
            layers = [_point(encoder(x_in))]
        return self.code_of(layers)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """Means ``(B, P)`` decoded from :meth:`encode`'s code of each image."""
        return self.decode(self.encode(x, condition), condition)


def _point(posterior: dist.Distribution) -> Tensor:
    """A point of q: the mean, the mode on the sphere, one draw when there is no closed form."""
    if isinstance(posterior, VonMisesFisher):
        return posterior.loc
    try:
        return posterior.mean
    except NotImplementedError:  # flows have no closed-form mean: use one sample
        return posterior.sample()
