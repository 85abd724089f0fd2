"""Inference-gap split: approximation gap and amortization gap of a trained VAE."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from pyro.infer import Trace_ELBO
from torch import Tensor, nn
from tqdm.auto import tqdm

from .evaluate import elbo, log_likelihood
from .model import VAE

__all__ = ["GapSplit", "fit_local_posteriors", "inference_gaps", "local_offsets"]


@dataclass(frozen=True)
class GapSplit:
    r"""Averages in nats per datapoint of the split (Cremer, Li & Duvenaud 2018).

    .. math:: \underbrace{\log p(x) - \mathcal{L}[q_\phi]}_{\text{inference gap}}
              = \underbrace{\log p(x) - \mathcal{L}[q^*]}_{\text{approximation}}
              + \underbrace{\mathcal{L}[q^*] - \mathcal{L}[q_\phi]}_{\text{amortization}}
    """

    log_likelihood: float
    elbo_local: float
    elbo_amortized: float
    num_points: int
    num_samples: int
    num_steps: int

    @property
    def approximation_gap(self) -> float:
        return self.log_likelihood - self.elbo_local

    @property
    def amortization_gap(self) -> float:
        return self.elbo_local - self.elbo_amortized

    @property
    def inference_gap(self) -> float:
        return self.log_likelihood - self.elbo_amortized

    def to_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "approximation_gap": self.approximation_gap,
            "amortization_gap": self.amortization_gap,
            "inference_gap": self.inference_gap,
        }

    def format(self, split: str) -> str:
        """The lines ``pyro-vae gaps`` prints for this result on ``split``."""
        lines = [
            f"{split} split, {self.num_points} images, {self.num_steps} local SVI steps, "
            f"K = {self.num_samples} (nats per image)"
        ]
        for label, value in (
            ("IS log p(x)", self.log_likelihood),
            ("ELBO[q*] (local, non-amortized)", self.elbo_local),
            ("ELBO[q_phi] (amortized)", self.elbo_amortized),
            ("approximation gap log p - ELBO[q*]", self.approximation_gap),
            ("amortization gap ELBO[q*] - ELBO[q]", self.amortization_gap),
            ("inference gap log p - ELBO[q]", self.inference_gap),
        ):
            lines.append(f"  {label:<38}{value:10.3f}")
        return "\n".join(lines)


@contextmanager
def local_offsets(encoder: nn.Module, batch_size: int) -> Iterator[list[nn.Parameter]]:
    """Give every ``nn.Linear`` of ``encoder`` a free bias per datapoint while inside.

    Each linear layer's output ``(*, B, out)`` gets ``+ offset`` with an offset ``(B, out)``
    (initialized at zero, so q starts as the amortized q_phi(z|x)). Outputs whose
    second-to-last dim is not B are left alone. Yields the offsets; hooks go on exit.
    """
    offsets: list[nn.Parameter] = []
    handles = []
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            offset = nn.Parameter(weight.new_zeros(batch_size, module.out_features))
            offsets.append(offset)

            def shift(_: nn.Module, __: tuple, out: Tensor, offset: Tensor = offset) -> Tensor:
                if out.dim() >= 2 and out.shape[-2] == offset.shape[0]:
                    return out + offset
                return out

            handles.append(module.register_forward_hook(shift))
    try:
        yield offsets
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for ``module``'s parameters, in eval mode, restored on exit."""
    flags, was_training = [(p, p.requires_grad) for p in module.parameters()], module.training
    module.eval()  # also tells PyroModule not to register frozen parameters
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def fit_local_posteriors(
    vae: VAE,
    x: Tensor,
    offsets: list[nn.Parameter],
    num_steps: int = 500,
    lr: float = 1e-2,
    num_particles: int = 10,
) -> list[float]:
    """Local SVI: maximize the ELBO of each row of x ``(B, P)`` over its own offsets only.

    The decoder and the amortized encoder weights stay frozen. The per-datapoint losses are
    separable and Adam acts elementwise, so fitting a batch at once is the same as fitting
    each datapoint alone. Returns the ELBO per datapoint after every step.
    """
    loss_fn = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    ).differentiable_loss
    optimizer = torch.optim.Adam(offsets, lr=lr)
    history: list[Tensor] = []
    with _frozen(vae):
        for step in range(1, num_steps + 1):
            try:
                loss = loss_fn(vae.model, vae.guide, x)
            except ValueError as error:  # a distribution met NaN parameters: one line
                if "invalid values" not in str(error) and "nan" not in str(error).lower():
                    raise
                raise ValueError(
                    f"local SVI diverged at step {step}: the local posteriors' parameters became "
                    f"NaN/inf; lower the learning rate (lr {lr:g})"
                ) from None
            if not torch.isfinite(loss):
                value = float(loss.detach())
                raise ValueError(
                    f"local SVI diverged at step {step}: loss {value}; lower the learning rate "
                    f"(lr {lr:g})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.detach())
    return (-torch.stack(history) / x.shape[0]).tolist()


def inference_gaps(
    vae: VAE,
    x: Tensor,
    num_steps: int = 500,
    lr: float = 1e-2,
    num_particles: int = 10,
    num_samples: int = 1000,
    batch_size: int = 100,
    progress: bool = False,
) -> tuple[GapSplit, dict[str, Tensor]]:
    r"""Split the inference gap of ``vae`` on the images x ``(N, P)``.

    For each datapoint, q* is a non-amortized posterior of the guide's own family, fitted by
    a local SVI with the decoder frozen (:func:`fit_local_posteriors`). Its free parameters
    are the per-datapoint biases of every linear layer of the encoder (:func:`local_offsets`),
    with the input x_n fixed. This is generic over the ``GUIDES`` registry: each family's
    distribution parameters (loc, scale, Cholesky factor, the parameters of conditional
    flows) come out of a linear layer, so the biases alone reach every member of the
    family (a parameter held directly as ``nn.Parameter`` would stay shared). q* starts
    from q_phi(z|x_n), so its ELBO can only improve on the amortized one, up to noise.
    Offsets on hidden layers are redundant but harmless.

    ELBO[q_phi] and ELBO[q*] use ``num_samples`` draws each; log p(x) is the larger of the
    two importance-sampled estimates (proposals q_phi and q*, ``num_samples`` each), both
    stochastic lower bounds of log p(x).

    Returns:
        The averages and, per datapoint ``(N,)``, ``log_likelihood``, ``elbo_local``,
        ``elbo_amortized``.
    """
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[-1] != vae.config.data_dim:
        raise ValueError(f"x must have shape (N, {vae.config.data_dim}), got {tuple(x.shape)}")
    for name, value in (("num_steps", num_steps), ("num_samples", num_samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    out: dict[str, list[Tensor]] = {"log_likelihood": [], "elbo_local": [], "elbo_amortized": []}
    was_training = vae.training
    vae.eval()
    try:
        for batch in tqdm(x.split(batch_size), desc="local SVI", disable=not progress):
            out["elbo_amortized"].append(elbo(vae, batch, num_samples))
            log_px = log_likelihood(vae, batch, num_samples)
            with local_offsets(vae.encoder, batch.shape[0]) as offsets:
                fit_local_posteriors(vae, batch, offsets, num_steps, lr, num_particles)
                out["elbo_local"].append(elbo(vae, batch, num_samples))
                log_px = torch.maximum(log_px, log_likelihood(vae, batch, num_samples))
            out["log_likelihood"].append(log_px)
    finally:
        vae.train(was_training)
    points = {k: torch.cat(v) for k, v in out.items()}
    split = GapSplit(
        **{k: float(v.mean()) for k, v in points.items()},
        num_points=x.shape[0],
        num_samples=num_samples,
        num_steps=num_steps,
    )
    return split, points
