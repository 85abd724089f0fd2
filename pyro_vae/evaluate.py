"""Estimators generic over guides: per-particle log weights, ELBO, importance-sampled log p(x)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from tqdm.auto import tqdm

from .model import VAE
from .priors import fixed_priors
from .validation import check_images, check_instance, check_positive_int, check_work

__all__ = [
    "Evaluation",
    "active_units",
    "batch_statistics",
    "elbo",
    "evaluate",
    "layer_active_units",
    "log_likelihood",
    "log_weights",
]

#: Default bound on particles x images x pixels held at once by the chunked estimators.
MAX_ELEMENTS = 2**24


@dataclass(frozen=True)
class Evaluation:
    """Per-datapoint averages in nats over ``num_points`` images."""

    elbo: float
    reconstruction: float
    kl: float
    log_likelihood: float
    num_samples: int
    num_points: int
    layer_kl: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """log p(x) - ELBO, an estimate of E_x KL(q(z|x) || p(z|x)) >= 0."""
        return self.log_likelihood - self.elbo

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the gap; ``layer_kl`` (per layer of a hierarchy) only when set."""
        out = {**asdict(self), "gap": self.gap}
        if not self.layer_kl:
            del out["layer_kl"]
        return out


def _site_log_prob(site: dict) -> Tensor:
    """Unscaled log density of a trace site, masked like Pyro does."""
    log_p = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        log_p = log_p * site["mask"]
    return log_p


def log_weights(
    vae: VAE, x: Tensor, num_particles: int, condition: Tensor | None = None
) -> dict[str, Tensor]:
    """Log densities of ``num_particles`` draws z ~ q(z|x), each of shape ``(K, B)``.

    Returns a dict with ``log_lik`` = log p(x|z) (observed sites), ``log_prior`` = log p(z)
    (latent model sites) and ``log_q`` = log q(z|x); the importance log weight is
    ``log_lik + log_prior - log_q``. ``kl:NAME`` is log q - log p of each latent site NAME
    (one per layer of a hierarchy). Scales from subsampling plates or annealing are ignored.
    ``condition`` ``(B, C)`` conditions a conditional VAE.
    """
    kwargs = {} if condition is None else {"condition": condition}
    with pyro.plate(f"{vae.prefix}.particles", num_particles, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x, **kwargs)
        model = poutine.trace(poutine.replay(vae.model, trace=guide_trace))
        model_trace = model.get_trace(x, **kwargs)
    zero = x.new_zeros(num_particles, x.shape[0])
    out = {"log_lik": zero, "log_prior": zero, "log_q": zero}
    for key, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            log_p = _site_log_prob(site)
            if key == "guide":
                out["log_q"] = out["log_q"] + log_p
                out[f"kl:{name}"] = out.get(f"kl:{name}", zero) + log_p
            elif site["is_observed"]:
                out["log_lik"] = out["log_lik"] + log_p
            else:
                out["log_prior"] = out["log_prior"] + log_p
                out[f"kl:{name}"] = out.get(f"kl:{name}", zero) - log_p
    return out


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _particle_chunk(vae: VAE, batch_size: int, max_elements: int) -> int:
    outputs = vae.likelihood.outputs_per_pixel * vae.config.data_dim
    # every layer's latents count (a full-covariance factor is D x D): sum(D_l) ** 2 bounds it
    per_particle = batch_size * (outputs + sum(vae.config.latent_dims) ** 2)
    return max(1, max_elements // per_particle)


@torch.no_grad()
def batch_statistics(
    vae: VAE,
    x: Tensor,
    num_samples: int,
    max_elements: int = MAX_ELEMENTS,
    condition: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per image ``(B,)``, from the same K = ``num_samples`` draws of q(z|x): the IS log p(x)
    (``log_likelihood``, the IWAE bound with K draws), the mean ``elbo`` with its
    ``reconstruction`` and ``kl`` terms, and per layer of a hierarchy ``kl:SITE``."""
    lse, sums = [], {"log_lik": 0.0, "kl": 0.0}
    with fixed_priors(vae):  # the pseudo-inputs of a VampPrior are encoded once
        for k in _chunks(num_samples, _particle_chunk(vae, x.shape[0], max_elements)):
            w = log_weights(vae, x, k, condition)
            lse.append(torch.logsumexp(w["log_lik"] + w["log_prior"] - w["log_q"], dim=0))
            sums["log_lik"] = sums["log_lik"] + w["log_lik"].sum(0)
            sums["kl"] = sums["kl"] + (w["log_q"] - w["log_prior"]).sum(0)
            if len(vae.latent_sites) > 1:
                for name in vae.latent_sites:
                    sums[f"kl:{name}"] = sums.get(f"kl:{name}", 0.0) + w[f"kl:{name}"].sum(0)
    log_px = torch.logsumexp(torch.stack(lse), dim=0) - math.log(num_samples)
    means = {key: value / num_samples for key, value in sums.items()}
    recon, kl = means.pop("log_lik"), means.pop("kl")
    return {
        "log_likelihood": log_px,
        "reconstruction": recon,
        "kl": kl,
        "elbo": recon - kl,
        **means,
    }


def _check(x: Tensor, vae: VAE, num_samples: int, condition: Tensor | None = None) -> None:
    check_instance("vae", vae, VAE)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    check_images("x", x, vae.config.data_dim, flat=True)
    check_work(
        f"num_samples {num_samples} for each of {x.shape[0]} images",
        2.0 * num_samples * x.shape[0] * vae.config.estimated_parameters(),
    )
    if condition is not None:
        check_instance("condition", condition, Tensor)
    if condition is not None and condition.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"condition must have shape (B, C) with B = {x.shape[0]}, got {tuple(condition.shape)}"
        )


def log_likelihood(
    vae: VAE,
    x: Tensor,
    num_samples: int = 5000,
    max_elements: int = MAX_ELEMENTS,
    condition: Tensor | None = None,
) -> Tensor:
    r"""Importance-sampled log p(x) per datapoint, ``(B,)``, with q(z|x) as proposal.

    .. math:: \log p(x) \approx \log \frac{1}{K} \sum_{k=1}^{K} \frac{p(x, z_k)}{q(z_k|x)},
              \quad z_k \sim q(z|x)

    K is processed in chunks holding at most ``max_elements`` particle-pixel values.
    ``condition`` ``(B, C)`` conditions a conditional VAE.
    """
    _check(x, vae, num_samples, condition)
    return batch_statistics(vae, x, num_samples, max_elements, condition)["log_likelihood"]


def elbo(
    vae: VAE,
    x: Tensor,
    num_samples: int = 1,
    max_elements: int = MAX_ELEMENTS,
    condition: Tensor | None = None,
) -> Tensor:
    """Monte Carlo ELBO per datapoint, ``(B,)``, averaged over ``num_samples`` draws."""
    _check(x, vae, num_samples, condition)
    return batch_statistics(vae, x, num_samples, max_elements, condition)["elbo"]


def evaluate(
    vae: VAE,
    x: Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: int = MAX_ELEMENTS,
    progress: bool = False,
    condition: Tensor | None = None,
) -> Evaluation:
    """ELBO, its reconstruction and KL terms, and IS log p(x), averaged over the rows of x.

    All four come from the same K draws per datapoint. x ``(N, P)`` must lie in the support
    of the VAE's likelihood; ``condition`` ``(N, C)`` conditions a conditional VAE. For
    continuous likelihoods (``vae.likelihood.discrete`` False) the values are log densities,
    not comparable with the log probabilities of discrete data.
    """
    _check(x, vae, num_samples, condition)
    check_positive_int("batch_size", batch_size)
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set of images")
    vae.likelihood.check_data(x, "x")
    totals = dict.fromkeys(("elbo", "reconstruction", "kl", "log_likelihood"), 0.0)
    conditions = [None] * x.shape[0] if condition is None else condition.split(batch_size)
    was_training = vae.training
    vae.eval()
    try:
        for batch, c in tqdm(
            zip(x.split(batch_size), conditions, strict=False),
            total=-(-x.shape[0] // batch_size),
            desc="evaluating",
            disable=not progress,
            leave=False,
        ):
            stats = batch_statistics(vae, batch, num_samples, max_elements, c)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value.sum())
    finally:
        vae.train(was_training)
    n = x.shape[0]
    layers = {
        key.split(":", 1)[1].removeprefix(f"{vae.prefix}."): totals.pop(key) / n
        for key in list(totals)
        if key.startswith("kl:")
    }
    return Evaluation(
        **{k: v / n for k, v in totals.items()},
        num_samples=num_samples,
        num_points=n,
        layer_kl=layers,
    )


def _check_units(vae: VAE, x: Tensor, num_samples: int, batch_size: int) -> None:
    check_instance("vae", vae, VAE)
    check_images("x", x, vae.config.data_dim, flat=True)
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)


@torch.no_grad()
def active_units(
    vae: VAE, x: Tensor, threshold: float = 0.01, num_samples: int = 100, batch_size: int = 500
) -> int:
    r"""Number of latent dimensions d with Cov_x(E_q[z_d | x]) > ``threshold`` over x ``(N, P)``.

    E_q[z|x] is the guide's closed-form mean, or the average of ``num_samples`` draws when it
    has none (flows, and every layer of a hierarchy, summed over its layers: see
    :func:`layer_active_units`); the draws add about Var_q / num_samples to each variance.

    References:
        Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2015), section 5.2
    """
    _check_units(vae, x, num_samples, batch_size)
    if len(vae.latent_sites) > 1:
        return sum(layer_active_units(vae, x, threshold, num_samples, batch_size).values())
    means = []
    for batch in x.split(batch_size):
        posterior = vae.encoder(batch)
        try:
            means.append(posterior.mean)
        except NotImplementedError:
            means.append(posterior.sample((num_samples,)).mean(0))
    return int((torch.cat(means).var(0) > threshold).sum())


@torch.no_grad()
def layer_active_units(
    vae: VAE, x: Tensor, threshold: float = 0.01, num_samples: int = 100, batch_size: int = 500
) -> dict[str, int]:
    """Active units of each latent site (layer), E_q[z_l | x] averaged over guide draws."""
    _check_units(vae, x, num_samples, batch_size)
    sums: dict[str, list[Tensor]] = {name: [] for name in vae.latent_sites}
    for batch in x.split(batch_size):
        with pyro.plate(f"{vae.prefix}.particles", num_samples, dim=-2):
            trace = poutine.trace(vae.guide).get_trace(batch)
        for name in sums:
            sums[name].append(trace.nodes[name]["value"].mean(0))  # (B, D_l)
    prefix = f"{vae.prefix}."
    return {
        name.removeprefix(prefix): int((torch.cat(means).var(0) > threshold).sum())
        for name, means in sums.items()
    }
