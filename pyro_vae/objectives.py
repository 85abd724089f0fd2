"""Training objectives (ELBO, analytic-KL ELBO, IWAE) and encoder-gradient estimators."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, is_identically_zero, torch_item, torch_sum
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl

from .model import VAE

__all__ = [
    "OBJECTIVES",
    "FreeBits_ELBO",
    "IWAE_ELBO",
    "GradientMoments",
    "encoder_gradient_moments",
    "kl_mvn_diagonal_normal",
    "make_objective",
    "scale_latent",
    "score_function",
]

#: Names accepted by :func:`make_objective` and ``TrainConfig.objective``.
OBJECTIVES = ("elbo", "meanfield", "iwae")


# ---------------------------------------------------------------- analytic KL


@register_kl(MultivariateNormal, Independent)
def kl_mvn_diagonal_normal(p: MultivariateNormal, q: Independent) -> Tensor:
    r"""KL(N(m, L L^T) || N(mu, diag s^2)) in closed form, shape ``p.batch_shape``.

    .. math:: \tfrac12 \sum_i \Big[\frac{(LL^T)_{ii} + (m_i - \mu_i)^2}{s_i^2} - 1
              + 2 \log s_i\Big] - \sum_i \log L_{ii}

    Registered in torch's KL registry (which Pyro's ``kl_divergence`` uses) on import of this
    module, so ``TraceMeanField_ELBO`` needs no sampling for the full-covariance guide.
    Raises NotImplementedError unless ``q`` is ``Independent(Normal, 1)``, so callers fall back
    to Monte Carlo.
    """
    if not (isinstance(q.base_dist, Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    var = q.base_dist.scale**2
    cov_diag = p.scale_tril.pow(2).sum(-1)  # (LL^T)_ii = sum_j L_ij^2
    mahalanobis = ((p.loc - q.base_dist.loc) ** 2 / var).sum(-1)
    log_det_ratio = var.log().sum(-1) - 2 * p.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * ((cov_diag / var).sum(-1) + mahalanobis - p.event_shape[0] + log_det_ratio)


# ---------------------------------------------------------------- IWAE


class IWAE_ELBO(RenyiELBO):  # noqa: N801 (Pyro's naming)
    r"""The K-sample importance-weighted bound (Burda et al. 2015) as a Pyro ELBO.

    .. math:: \mathcal{L}_K = \mathbb{E}\Big[\log \frac1K \sum_{k=1}^K
              \frac{p(x, z_k)}{q(z_k|x)}\Big], \quad z_k \sim q(z|x)

    Built on Pyro's ``RenyiELBO(alpha=0)`` (same traces, same log weights per datapoint), with
    the ``differentiable_loss`` that ``RenyiELBO`` lacks. The K particles are vectorized.
    Under a subsampled data plate Pyro scales every site by N/B, which must not enter the
    log-sum-exp: the bound is computed from unscaled log densities per datapoint and the
    common scale is applied afterwards. ``RenyiELBO``'s own ``loss`` and ``loss_and_grads``
    put the scale inside the log-sum-exp, so both are overridden here to compute the same
    objective as ``differentiable_loss`` (``loss`` without building a graph,
    ``loss_and_grads`` by backpropagating it); inside ``SVI`` every method therefore agrees,
    subsampled or not. Guides must be fully reparameterized.

    References:
        Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2015)
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1) -> None:
        super().__init__(
            alpha=0,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )

    def _loss_and_traces(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Trace, Trace]:
        """-L_K (a scalar tensor) with the model and guide traces it came from."""
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_w, scales = 0.0, set()
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for site in trace.nodes.values():
                if site["type"] != "sample":
                    continue
                if sign < 0 and not site["fn"].has_rsample:
                    raise ValueError(f"IWAE needs a reparameterized guide; site {site['name']!r}")
                log_p = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
                log_w = log_w + sign * torch_sum(log_p, sum_dims)
                scales.add(float(site["scale"]))
        if is_identically_zero(log_w):
            return torch.zeros(()), model_trace, guide_trace
        if len(scales) != 1:
            raise ValueError(f"IWAE needs one common subsampling scale, got {sorted(scales)}")
        if self.num_particles == 1:
            log_w = log_w.unsqueeze(0)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)
        return -bound.sum() * scales.pop(), model_trace, guide_trace

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        """-L_K summed over the data plate (scaled to the full data set), a scalar."""
        loss, _, _ = self._loss_and_traces(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The value of :meth:`differentiable_loss` as a float, without building gradients."""
        with torch.no_grad():
            loss, _, _ = self._loss_and_traces(model, guide, args, kwargs)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The value of :meth:`differentiable_loss` as a float, after backpropagating it.

        As in Pyro's ``Trace_ELBO``, gradients accumulate in ``.grad`` of the parameters seen
        by the model and guide, and nothing is backpropagated when the traces have no ``param``
        sites or the loss does not require grad.
        """
        loss, model_trace, guide_trace = self._loss_and_traces(model, guide, args, kwargs)
        trainable_params = any(
            site["type"] == "param"
            for trace in (model_trace, guide_trace)
            for site in trace.nodes.values()
        )
        if trainable_params and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss.detach())
        warn_if_nan(loss, "loss")
        return loss


def make_objective(name: str = "elbo", num_particles: int = 1) -> ELBO:
    """The Pyro ELBO object behind ``TrainConfig.objective``; use its ``differentiable_loss``.

    Args:
        name: ``elbo`` (``Trace_ELBO``), ``meanfield`` (``TraceMeanField_ELBO``: closed-form
            KL(q || p) where registered, Monte Carlo otherwise) or ``iwae`` (:class:`IWAE_ELBO`).
        num_particles: Samples of z per image (K of the IWAE bound).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if name == "iwae":
        return IWAE_ELBO(num_particles=num_particles)
    cls = Trace_ELBO if name == "elbo" else TraceMeanField_ELBO
    return cls(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


# ---------------------------------------------------------------- gradient estimators


class _NoRsample(TorchDistribution):
    """Wraps a distribution so Pyro samples it without a pathwise gradient (score function)."""

    has_rsample = False

    def __init__(self, base: dist.Distribution) -> None:
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:  # noqa: ANN401
        return self.base_dist.support

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> _NoRsample:  # noqa: ANN401
        return _NoRsample(self.base_dist.expand(batch_shape))

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.base_dist.sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base_dist.log_prob(value)


class score_function(Messenger):  # noqa: N801 (a Pyro handler)
    """Handler that turns reparameterization off at the latent sites it sees.

    Inside it, Pyro's ELBOs build the score-function surrogate
    ``log q(z|x) * (log p(x, z) - log q(z|x)).detach()`` instead of differentiating z.
    """

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if not msg["is_observed"] and msg["fn"].has_rsample:
            msg["fn"] = _NoRsample(msg["fn"])


class scale_latent(Messenger):  # noqa: N801 (a Pyro handler)
    r"""Handler that multiplies the log densities of latent sample sites by ``beta`` >= 0.

    Active around both the model and the guide of an ELBO, it weights each named latent
    site's ``log p(z) - log q(z|x)`` and leaves the likelihood at scale 1:

    .. math:: \mathcal{L}_\beta = \mathbb{E}_q[\log p(x|z)]
              - \beta\, \mathbb{E}_q[\log q(z|x) - \log p(z)]

    (KL warm-up; Bowman et al. 2016, Sonderby et al. 2016; for an L-layer model every layer's
    KL term). Unlike ``poutine.scale`` it accepts ``beta = 0``. The factor multiplies any
    subsampling scale already on the site.

    Args:
        name: The latent site, e.g. ``f"{vae.prefix}.z"``, or several (``vae.latent_sites``).
        beta: The weight, a finite number >= 0; 1 leaves the sites unchanged.
    """

    def __init__(self, name: str | Sequence[str], beta: float) -> None:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        super().__init__()
        self.names = {name} if isinstance(name, str) else set(name)
        self.beta = float(beta)

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and msg["name"] in self.names and self.beta != 1.0:
            msg["scale"] = self.beta * msg["scale"]


class FreeBits_ELBO(Trace_ELBO):  # noqa: N801 (Pyro's naming)
    r"""The ELBO with each latent site's KL term held at ``free_bits`` nats or more.

    .. math:: \mathcal{L}_\lambda = \mathbb{E}_q[\log p(x|z)] - \sum_l
              \max\big(\lambda,\ \overline{\mathrm{KL}}_l\big)

    per image, where :math:`\overline{\mathrm{KL}}_l` is the single-draw estimate of
    :math:`\log q(z_l|\cdot) - \log p(z_l|\cdot)` averaged over the minibatch (and
    particles): a layer whose KL is below lambda gets no gradient pushing it lower, which
    keeps upper layers of a hierarchy from collapsing (Kingma et al. 2016). Every latent
    site of the guide is one layer. Each term is scaled like its sites (subsampling N / B,
    a KL warm-up weight), so with ``free_bits`` = 0 the objective is the ELBO whenever the
    minibatch KL estimates are non-negative. Guides must be reparameterized.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)

    Args:
        free_bits: lambda, nats per layer and image, >= 0.
        num_particles: Vectorized draws of z per image.
    """

    def __init__(self, free_bits: float, num_particles: int = 1, max_plate_nesting: int = 1):
        if not (isinstance(free_bits, (int, float)) and math.isfinite(free_bits)):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}")
        if free_bits < 0:
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}")
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=max_plate_nesting,
        )
        self.free_bits = float(free_bits)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        """-L_lambda of the data (scaled to the full data set), a scalar."""
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            draws = self.num_particles if self.vectorize_particles else 1
            loss = loss - self._layer_terms(model_trace, guide_trace, draws)
        return loss / (1 if self.vectorize_particles else self.num_particles)

    def _layer_terms(self, model_trace: Any, guide_trace: Any, draws: int) -> Tensor:  # noqa: ANN401
        """sum of scaled log-likelihoods minus the floored, scaled KL terms of one trace pair."""
        total = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                total = total + site["log_prob_sum"] / draws
                continue
            q = guide_trace.nodes[name]
            if not q["fn"].has_rsample:
                raise ValueError(f"free bits need a reparameterized guide; site {name!r}")
            kl = q["unscaled_log_prob"] - site["unscaled_log_prob"]  # (K, B) or (B,)
            floored = kl.mean().clamp_min(self.free_bits)
            total = total - q["scale"] * kl.shape[-1] * floored
        return total


@dataclass(frozen=True)
class GradientMoments:
    """Per-element mean and variance of single-draw gradient estimates, by parameter name."""

    mean: dict[str, Tensor]
    variance: dict[str, Tensor]
    num_draws: int


def encoder_gradient_moments(
    vae: VAE, x: Tensor, num_draws: int, estimator: str = "pathwise", copies: int = 1
) -> GradientMoments:
    r"""Per-element mean and variance of the single-draw gradient d(-ELBO / B)/d(encoder).

    A single draw is ``Trace_ELBO`` with one z per image of x ``(B, P)``; ``estimator`` is
    ``pathwise`` (reparameterized) or ``score`` (the same guide under :class:`score_function`).
    To spare Pyro's per-call overhead, each of the ``num_draws`` calls stacks ``copies``
    replicas of x, so it returns the average G of ``copies`` independent draws; then
    Var(single draw) = copies * Var(G), and ``num_draws * copies`` draws enter the mean.
    ``num_draws`` of the result counts single draws.
    """
    if estimator not in ("pathwise", "score"):
        raise ValueError(f"estimator must be 'pathwise' or 'score', got {estimator!r}")
    for name, value in (("num_draws", num_draws), ("copies", copies)):
        if not isinstance(value, int) or value < 1 + (name == "num_draws"):
            raise ValueError(
                f"{name} must be an integer >= {1 + (name == 'num_draws')}, got {value!r}"
            )
    guide = score_function()(vae.guide) if estimator == "score" else vae.guide
    loss_fn = Trace_ELBO(max_plate_nesting=1).differentiable_loss
    params = {k: p for k, p in vae.encoder.named_parameters() if p.requires_grad}
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    square = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    rows = x.repeat(copies, 1)
    for _ in range(num_draws):
        loss = loss_fn(vae.model, guide, rows) / rows.shape[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, p), g in zip(params.items(), grads, strict=True):
            g = torch.zeros_like(p) if g is None else g
            total[k] += g.double()
            square[k] += g.double() ** 2
    mean = {k: v / num_draws for k, v in total.items()}
    var = {
        k: (copies * (square[k] - num_draws * mean[k] ** 2) / (num_draws - 1)).clamp_min(0)
        for k in total
    }
    return GradientMoments(mean, var, num_draws * copies)
