"""Training objectives (ELBO, analytic-KL ELBO, IWAE) and encoder-gradient estimators."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, JitTrace_ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import (
    get_dependent_plate_dims,
    is_identically_zero,
    is_validation_enabled,
    torch_item,
    torch_sum,
)
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan
from torch import Tensor
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)

from .model import VAE

__all__ = [
    "GRADIENT_ESTIMATORS",
    "OBJECTIVES",
    "DReG_IWAE_ELBO",
    "FreeBits_ELBO",
    "IWAE_ELBO",
    "JitSTL_ELBO",
    "STL_ELBO",
    "STL_MeanField_ELBO",
    "GradientMoments",
    "check_gradient_estimator",
    "encoder_gradient_moments",
    "kl_mvn_diagonal_normal",
    "make_objective",
    "scale_latent",
    "score_function",
]

#: Names accepted by :func:`make_objective` and ``TrainConfig.objective``.
OBJECTIVES = ("elbo", "meanfield", "iwae")

#: Encoder-gradient estimators each objective accepts (``TrainConfig.gradient_estimator``).
GRADIENT_ESTIMATORS = {
    "elbo": ("pathwise", "stl"),
    "meanfield": ("pathwise", "stl"),
    "iwae": ("pathwise", "dreg"),
}


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
        sums, scales = [0.0, 0.0], set()  # log p(x, z) and log q(z|x), each (K, B)
        for index, trace in enumerate((model_trace, guide_trace)):
            for site in trace.nodes.values():
                if site["type"] != "sample":
                    continue
                if index and not site["fn"].has_rsample:
                    raise ValueError(f"IWAE needs a reparameterized guide; site {site['name']!r}")
                log_p = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
                sums[index] = sums[index] + torch_sum(log_p, sum_dims)
                scales.add(float(site["scale"]))
        log_p, log_q = sums
        log_w = log_p - log_q
        if is_identically_zero(log_w):
            return torch.zeros(()), model_trace, guide_trace
        if len(scales) != 1:
            raise ValueError(f"IWAE needs one common subsampling scale, got {sorted(scales)}")
        if self.num_particles == 1:
            log_w, log_p, log_q = (torch.as_tensor(t).unsqueeze(0) for t in (log_w, log_p, log_q))
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)
        bound = self._gradient_bound(bound, log_p, log_q, model_trace, guide_trace, sum_dims)
        return -bound.sum() * scales.pop(), model_trace, guide_trace

    def _gradient_bound(
        self, bound: Tensor, log_p: Tensor, log_q: Tensor, model_trace: Trace,
        guide_trace: Trace, sum_dims: list,
    ) -> Tensor:  # fmt: skip
        """The bound per datapoint ``(B,)`` whose gradient is the estimator's (here: its own),
        from log p(x, z) and log q(z|x), each ``(K, B)``."""
        return bound

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


def make_objective(
    name: str = "elbo", num_particles: int = 1, gradient_estimator: str = "pathwise"
) -> ELBO:
    """The Pyro ELBO object behind ``TrainConfig.objective``; use its ``differentiable_loss``.

    Args:
        name: ``elbo`` (``Trace_ELBO``), ``meanfield`` (``TraceMeanField_ELBO``: closed-form
            KL(q || p) where registered, Monte Carlo otherwise) or ``iwae`` (:class:`IWAE_ELBO`).
        num_particles: Samples of z per image (K of the IWAE bound).
        gradient_estimator: ``pathwise`` (the objective's own gradient), ``stl`` for ``elbo``
            and ``meanfield`` (:class:`STL_ELBO`, :class:`STL_MeanField_ELBO`) or ``dreg``
            for ``iwae`` (:class:`DReG_IWAE_ELBO`).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    check_gradient_estimator(name, gradient_estimator)
    if name == "iwae":
        cls = DReG_IWAE_ELBO if gradient_estimator == "dreg" else IWAE_ELBO
        return cls(num_particles=num_particles)
    stl = gradient_estimator == "stl"
    if name == "elbo":
        cls = STL_ELBO if stl else Trace_ELBO
    else:
        cls = STL_MeanField_ELBO if stl else TraceMeanField_ELBO
    return cls(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


def check_gradient_estimator(objective: str, estimator: str) -> None:
    """ValueError (one line) unless ``estimator`` is one of ``GRADIENT_ESTIMATORS[objective]``."""
    names = list(dict.fromkeys(e for fits in GRADIENT_ESTIMATORS.values() for e in fits))
    if estimator not in names:
        raise ValueError(
            f"unknown gradient_estimator {estimator!r}; choose one of {', '.join(names)}"
        )
    fits = GRADIENT_ESTIMATORS.get(objective, ())
    if estimator not in fits:
        raise ValueError(
            f"gradient_estimator {estimator!r} does not fit objective {objective!r}, which "
            f"takes {' or '.join(repr(e) for e in fits)}"
        )


# ---------------------------------------------------------------- STL and DReG

#: Key of a trace site's log density re-scored at its detached value (see _score_at_fixed_draws).
_FIXED = "log_prob_at_fixed_draw"


def _sample_sites(trace: Trace, value_of: Callable[[str, dict], Any]) -> Trace:
    """The sample sites of ``trace`` (subsample sites too), each with ``value_of(name, site)``
    as its value: a trace to replay."""
    out = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            out.add_node(name, **{**site, "value": value_of(name, site)})
    return out


def _detached(trace: Trace) -> Trace:
    """The sample sites of ``trace`` (subsample sites too) with their values detached."""
    return _sample_sites(
        trace,
        lambda _, site: (
            site["value"].detach() if torch.is_tensor(site["value"]) else site["value"]
        ),
    )


def _describe(fn: dist.Distribution) -> str:
    """``TransformedDistribution through ConditionedPlanar`` and the like, for messages."""
    transforms = getattr(fn, "transforms", None)
    if not transforms:
        return type(fn).__name__
    names = dict.fromkeys(type(t).__name__ for t in transforms)
    return f"{type(fn).__name__} through {', '.join(names)}"


def _score_at_fixed_draws(
    estimator: str,
    guide: Callable,
    draws: Trace,
    args: tuple,
    kwargs: dict,
    sites: dict[str, dict],
) -> None:
    r"""Store in each of ``sites`` its log q(z) re-scored with z held fixed: site[_FIXED].

    Re-runs ``guide`` with every draw of ``draws`` (the unpruned guide trace)
    replayed detached, so each site's log density at its own value is a function of the
    parameters only, with every z, also the z a later layer is conditioned on, held fixed:
    its gradient is the score term :math:`\partial_\phi \log q_\phi(z)|_z`. The guide's
    distribution is built anew, so a density that scores its own draw from cached noise
    takes its general formula; a family that can score only its own draws (a flow without
    an analytic inverse) is refused with a ValueError.
    """
    fixed = poutine.trace(poutine.replay(guide, trace=_detached(draws))).get_trace(*args, **kwargs)
    for name, site in sites.items():
        twin = fixed.nodes[name]
        try:
            site[_FIXED] = twin["fn"].log_prob(twin["value"])
        except (NotImplementedError, KeyError) as error:
            raise ValueError(
                f"gradient estimator {estimator!r} needs log q of guide site {name!r} at a "
                f"given z, and its {_describe(twin['fn'])} scores only its own draws (no "
                "analytic inverse); use gradient_estimator 'pathwise'"
            ) from error


def _latent_sites(trace: Trace, estimator: str) -> dict[str, dict]:
    """The latent sample sites of a guide trace by name; ValueError unless reparameterized."""
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise ValueError(
                f"gradient estimator {estimator!r} needs a reparameterized guide; site {name!r} "
                "is not"
            )
        sites[name] = site
    return sites


class _StickingTheLanding:
    r"""Mixin for Pyro's ELBOs: drop the score term of every Monte Carlo log q(z|x).

    At each reparameterized guide site scored by Monte Carlo, the entropy term of the site's
    score parts (the ``log q`` every Pyro ELBO puts into its surrogate) loses
    ``scale * (log q_phi(sg z) - its value)``: zero in value, with gradient
    :math:`\partial_\phi \log q_\phi(z)|_z`, the score term. Only the traces change, so the
    eager ELBOs and ``JitTrace_ELBO`` take the mixin alike.
    """

    def _monte_carlo_sites(self, model_trace: Trace, guide_trace: Trace) -> dict[str, dict]:
        return _latent_sites(guide_trace, "stl")

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        recorder = poutine.trace(guide)  # the unpruned guide trace, subsample sites included
        model_trace, guide_trace = super()._get_trace(model, recorder, args, kwargs)
        sites = self._monte_carlo_sites(model_trace, guide_trace)
        if sites and torch.is_grad_enabled():
            _score_at_fixed_draws("stl", guide, recorder.trace, args, kwargs, sites)
            for site in sites.values():
                score = scale_and_mask(site.pop(_FIXED), site["scale"], site["mask"])
                parts = site["score_parts"]
                site["score_parts"] = parts._replace(
                    entropy_term=parts.entropy_term - (score - score.detach())
                )
        return model_trace, guide_trace

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The objective's value as a float (no gradient, nothing re-scored)."""
        with torch.no_grad():
            return super().loss(model, guide, *args, **kwargs)


class STL_ELBO(_StickingTheLanding, Trace_ELBO):  # noqa: N801 (Pyro's naming)
    r"""``Trace_ELBO`` with the "sticking the landing" encoder gradient (Roeder et al. 2017).

    .. math:: \nabla_\phi \big[\log p_\theta(x, z) - \log q_{\bot(\phi)}(z|x)\big],
              \quad z = g_\phi(\epsilon, x)

    The pathwise gradient without the score term :math:`-\partial_\phi \log q_\phi(z|x)`,
    whose expectation is zero: unbiased, and exactly zero when q(z|x) is the true posterior
    (then log p(x, z) - log q(z|x) = log p(x) for every z). The loss value and the decoder's
    gradient are ``Trace_ELBO``'s; ``differentiable_loss``, ``loss`` and ``loss_and_grads``
    agree. log q is re-scored once per step at the detached draws (one more guide pass); each
    latent site must be reparameterized, and guides that score only their own draws
    (planar, radial and Sylvester flows) are refused with a ValueError. Parameters shared by
    the guide with the model (a ladder posterior's top-down layers) lose only the
    zero-mean score term of log q as well.

    References:
        Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference (Roeder, Wu & Duvenaud, 2017)
    """


class JitSTL_ELBO(_StickingTheLanding, JitTrace_ELBO):  # noqa: N801 (Pyro's naming)
    """:class:`STL_ELBO` compiled like ``JitTrace_ELBO``: the guide's second pass and the
    score term are traced into the same graph (one per batch size, traced at its first step).
    """


class STL_MeanField_ELBO(_StickingTheLanding, TraceMeanField_ELBO):  # noqa: N801
    """``TraceMeanField_ELBO`` with the STL gradient at the sites whose KL is Monte Carlo.

    Where KL(q || p) has a closed form the objective has no log q(z|x) term and no score
    term to drop, so those sites are left as they are (for a Gaussian guide under the
    standard prior this class equals ``TraceMeanField_ELBO``); sites without a registered
    KL (flows, a mixture or VampPrior) and guide-only sites get :class:`STL_ELBO`'s term.
    """

    def _monte_carlo_sites(self, model_trace: Trace, guide_trace: Trace) -> dict[str, dict]:
        sites = _latent_sites(guide_trace, "stl")
        return {
            name: site
            for name, site in sites.items()
            if name not in model_trace.nodes
            or not _has_closed_form_kl(site, model_trace.nodes[name])
        }


def _has_closed_form_kl(guide_site: dict, model_site: dict) -> bool:
    """Whether ``TraceMeanField_ELBO`` takes KL(q || p) of this site in closed form."""
    try:
        with torch.no_grad():
            kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return False
    return True


class DReG_IWAE_ELBO(IWAE_ELBO):  # noqa: N801 (Pyro's naming)
    r"""The IWAE bound with the doubly reparameterized encoder gradient (Tucker et al. 2018).

    With :math:`w_k = p(x, z_k) / q(z_k|x)`, :math:`\tilde w_k = w_k / \sum_j w_j` and
    :math:`z_k = g_\phi(\epsilon_k, x)`, the encoder gets

    .. math:: \sum_k \tilde w_k^2\, \nabla_z \log w_k \big|_{z_k}
              \frac{\partial z_k}{\partial \phi}

    in place of IWAE's :math:`\sum_k \tilde w_k \nabla_\phi \log w_k`, whose score term
    makes the gradient's signal-to-noise ratio fall like 1/sqrt(K) (Rainforth et al. 2018);
    the expectation is the same. The decoder keeps IWAE's
    :math:`\sum_k \tilde w_k \nabla_\theta \log p_\theta(x, z_k)`, and the value is the
    bound, subsampling scale N/B outside the log-mean-exp as in :class:`IWAE_ELBO`.

    One pass of the model: it reads each draw through a copy :math:`z'_k` whose gradient
    reaches :math:`z_k` multiplied by :math:`\tilde w_k` (known once the model has run), and
    the surrogate per datapoint is

    .. math:: \sum_k \bot(\tilde w_k) \log p_\theta(x, z'_k)
              - \bot(\tilde w_k^2) \big[\log q_\phi(z_k) - \log q_\phi(\bot z_k)
              + \bot(\cdot)\big]

    so the decoder's parameters see :math:`\tilde w_k` and every path through z sees
    :math:`\tilde w_k^2`; the guide alone is re-run at the detached draws for its score term.
    Parameters shared by model and guide get the model part with weight w~ and the path part
    with w~^2. A latent outside the data plate makes log w one sum over the batch, and each
    particle's one weight scales all its draws. Guides that score only their own draws
    (planar, radial, Sylvester) are refused.

    References:
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives
        (Tucker, Lawson, Gu & Maddison, 2018)
    """

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        if not torch.is_grad_enabled():
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        sites = _latent_sites(guide_trace, "dreg")
        _score_at_fixed_draws("dreg", guide, guide_trace, args, kwargs, sites)
        weights = _ParticleWeights()  # with one particle w~ = 1: nothing to scale
        draws = weights.scaled_copy(guide_trace, sites) if self.num_particles > 1 else guide_trace
        model_trace = poutine.trace(poutine.replay(model, trace=draws), graph_type="flat")
        model_trace = model_trace.get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        if is_validation_enabled():
            for site in (*model_trace.nodes.values(), *guide_trace.nodes.values()):
                if site["type"] == "sample":
                    check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        model_trace.particle_weights = weights  # read by _gradient_bound
        return model_trace, guide_trace

    def _gradient_bound(
        self, bound: Tensor, log_p: Tensor, log_q: Tensor, model_trace: Trace,
        guide_trace: Trace, sum_dims: list,
    ) -> Tensor:  # fmt: skip
        if not torch.is_grad_enabled():
            return bound
        score = self._fixed_sum(guide_trace, sum_dims)
        if self.num_particles == 1:
            score = score.unsqueeze(0)
        log_w = log_p - log_q
        weights = torch.softmax(log_w.detach(), dim=0)  # w~_k, (K, B)
        model_trace.particle_weights.set(weights, sum_dims)
        path_q = log_q - (score - score.detach())  # gradient: the path part of log q only
        surrogate = (weights * log_p - weights.square() * path_q).sum(0)
        return bound.detach() + (surrogate - surrogate.detach())

    @staticmethod
    def _fixed_sum(trace: Trace, sum_dims: list) -> Tensor:
        """Sum over the sites of ``trace`` of their re-scored log densities, unscaled."""
        total = 0.0
        for site in trace.nodes.values():
            if _FIXED in site:
                log_p = scale_and_mask(site[_FIXED], mask=site["mask"])
                total = total + torch_sum(log_p, sum_dims)
        return total


class _ParticleWeights:
    """Normalized importance weights w~, set after the model ran, that scale the gradient of
    each draw the model read (see :class:`DReG_IWAE_ELBO`)."""

    def __init__(self) -> None:
        #: w~ ``(K, ...)`` with a dimension of size 1 for every plate summed into log w, so it
        #: broadcasts against each site's batch shape
        self.value: Tensor | None = None

    def set(self, weights: Tensor, sum_dims: list) -> None:
        """Store ``weights`` ``(K, ...)`` of log w, whose ``sum_dims`` were summed away."""
        for dim in sorted(sum_dims, reverse=True):  # each summed plate back, of size 1
            weights = weights.unsqueeze(dim)
        self.value = weights

    def scaled_copy(self, trace: Trace, sites: dict[str, dict]) -> Trace:
        """``trace`` for the model to replay: each of ``sites`` holds a copy of its draw whose
        gradient is multiplied by the weights on its way back to the draw."""
        return _sample_sites(trace, lambda name, site: self._scaled(site, name in sites))

    def _scaled(self, site: dict, latent: bool) -> Any:  # noqa: ANN401
        value = site["value"]
        if not latent or not value.requires_grad:
            return value
        event = (1,) * site["fn"].event_dim
        value = value.clone()
        value.register_hook(lambda grad: grad * self.value.reshape(self.value.shape + event))
        return value


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
        beta: The weight, a finite number >= 0; 1 leaves the sites unchanged. A 0-dim
            tensor is applied as given (unchecked), so a compiled loss can take it as input.
    """

    def __init__(self, name: str | Sequence[str], beta: float | Tensor) -> None:
        if not isinstance(beta, Tensor):
            if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
                raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
            beta = float(beta)
        super().__init__()
        self.names = {name} if isinstance(name, str) else set(name)
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample" or msg["name"] not in self.names:
            return
        if isinstance(self.beta, Tensor) or self.beta != 1.0:
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

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The value of :meth:`differentiable_loss` as a float, without building gradients."""
        with torch.no_grad():
            loss = torch_item(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """:meth:`differentiable_loss` backpropagated (what ``SVI.step`` calls); its value."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss.detach() if torch.is_tensor(loss) else loss)
        warn_if_nan(loss, "loss")
        return loss

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

    def snr(self) -> dict[str, Tensor]:
        """Per-element signal-to-noise ratio |mean| / sd of a single draw, by parameter name.

        0 where both are 0 (an element no draw moves).
        """
        tiny = torch.finfo(torch.float64).tiny
        return {k: m.abs() / self.variance[k].sqrt().clamp_min(tiny) for k, m in self.mean.items()}


#: Estimators :func:`encoder_gradient_moments` takes, per objective.
_MOMENT_ESTIMATORS = {"elbo": ("score", "pathwise", "stl"), "iwae": ("pathwise", "dreg")}


def _estimator_loss(
    vae: VAE, estimator: str, objective: str, num_particles: int
) -> tuple[Callable, Callable]:
    """The guide and the ``differentiable_loss`` behind one estimator of the moments."""
    fits = _MOMENT_ESTIMATORS.get(objective)
    if fits is None:
        raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")
    if estimator not in fits:
        raise ValueError(
            f"estimator must be {' or '.join(repr(e) for e in fits)} for objective "
            f"{objective!r}, got {estimator!r}"
        )
    if estimator == "score":
        guide, estimator = score_function()(vae.guide), "pathwise"
    else:
        guide = vae.guide
    return guide, make_objective(objective, num_particles, estimator).differentiable_loss


def encoder_gradient_moments(
    vae: VAE,
    x: Tensor,
    num_draws: int,
    estimator: str = "pathwise",
    copies: int = 1,
    objective: str = "elbo",
    num_particles: int = 1,
) -> GradientMoments:
    r"""Per-element mean and variance of the single-draw gradient d(-L / B)/d(encoder).

    With ``objective="elbo"``, L is the ELBO (``Trace_ELBO``, ``num_particles`` z per image
    of x ``(B, P)``) and ``estimator`` is ``pathwise`` (reparameterized), ``score`` (the same
    guide under :class:`score_function`) or ``stl`` (:class:`STL_ELBO`); with ``iwae``, L is
    the K = ``num_particles`` bound and ``estimator`` is ``pathwise`` (:class:`IWAE_ELBO`) or
    ``dreg`` (:class:`DReG_IWAE_ELBO`). To spare Pyro's per-call overhead, each of the
    ``num_draws`` calls stacks ``copies`` replicas of x, so it returns the average G of
    ``copies`` independent draws; then Var(single draw) = copies * Var(G), and
    ``num_draws * copies`` draws enter the mean. ``num_draws`` of the result counts single
    draws.
    """
    guide, loss_fn = _estimator_loss(vae, estimator, objective, num_particles)
    for name, value in (("num_draws", num_draws), ("copies", copies)):
        if not isinstance(value, int) or value < 1 + (name == "num_draws"):
            raise ValueError(
                f"{name} must be an integer >= {1 + (name == 'num_draws')}, got {value!r}"
            )
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
