"""The guide registry and the AmortizedGuide base every q(z|x) family derives from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Transform

from ..distributions import NoiseScoredNormal
from ..networks import MLP, check_hidden_dims
from ..validation import check_key, check_positive_int, registrar

__all__ = [
    "GUIDES",
    "MIN_SCALE",
    "AmortizedGuide",
    "FlowGuide",
    "make_guide",
    "register_guide",
]

#: Registry of guide families, key -> class; the CLI's ``--guide`` choices and the tests read it.
GUIDES: dict[str, type[AmortizedGuide]] = {}

MIN_SCALE = 1e-4


#: ``@register_guide("key")``: class decorator adding a guide family to ``GUIDES``.
register_guide = registrar(GUIDES, "guide")


def make_guide(
    key: str,
    data_dim: int,
    latent_dim: int,
    hidden_dims: Sequence[int] = (400,),
    trunk: nn.Module | None = None,
    context_dim: int | None = None,
    **options: Any,
) -> AmortizedGuide:
    """Build the guide registered under ``key``; ``options`` go to its constructor.

    ``trunk`` replaces the MLP encoder trunk h(x) of any family: a module ``(*, P) -> (*, C)``
    with C = ``context_dim`` (default ``trunk.out_dim``); the heads are then sized to C.
    """
    check_key(GUIDES, "guide", key)
    if trunk is not None:
        context_dim = context_dim or getattr(trunk, "out_dim", None)
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(
                f"a custom trunk needs context_dim (its output width), got {context_dim!r}"
            )
        hidden_dims = (context_dim,)  # the last width is the context size C of the heads
    try:
        guide = GUIDES[key](data_dim, latent_dim, hidden_dims, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options!r} for guide {key!r}: {error}") from None
    if trunk is not None:
        guide.trunk = trunk
    return guide


class AmortizedGuide(nn.Module):
    """Encoder trunk h(x) and a diagonal Gaussian head; ``forward(x)`` returns q(z|x).

    Subclasses implement ``__init__`` and ``forward``; ``forward`` returns a distribution with
    batch shape ``(B,)`` and event shape ``(D,)`` for ``x`` of shape ``(B, P)``. The class
    attribute ``latent`` declares the space z lives in (``euclidean`` R^D or ``sphere``);
    ``traceable = False`` keeps ``fit`` from compiling the loss by default (for a forward pass
    that branches on tensor values or computes outside torch, which ``torch.jit.trace``
    would freeze at its first call).

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
    """

    key: str = ""
    latent: str = "euclidean"
    traceable: bool = True

    def __init__(
        self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (400,)
    ) -> None:
        super().__init__()
        check_positive_int("data_dim", data_dim)
        check_positive_int("latent_dim", latent_dim)
        dims = check_hidden_dims(hidden_dims)
        self.data_dim, self.latent_dim, self.context_dim = data_dim, latent_dim, dims[-1]
        self.trunk = MLP(data_dim, dims[:-1], dims[-1], final_activation=True)
        self.loc = nn.Linear(self.context_dim, latent_dim)
        self.raw_scale = nn.Linear(self.context_dim, latent_dim)

    def loc_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean ``(B, D)``, positive scale ``(B, D)`` and context h(x) ``(B, C)``."""
        h = self.trunk(x)
        return self.loc(h), F.softplus(self.raw_scale(h)) + MIN_SCALE, h

    def diagonal_normal(self, x: Tensor) -> tuple[Distribution, Tensor]:
        """Base Gaussian N(mu(x), diag sigma(x)^2) (batch ``(B,)``, event ``(D,)``) and h(x)."""
        loc, scale, h = self.loc_scale(x)
        return NoiseScoredNormal(loc, scale).to_event(1), h

    def forward(self, x: Tensor) -> Distribution:
        raise NotImplementedError


class FlowGuide(AmortizedGuide):
    r"""Base of the normalizing-flow guides: q0(z0|x) pushed through K maps conditioned on h(x).

    .. math:: z = f_K \circ \dots \circ f_1(z_0), \quad
              \log q(z|x) = \log q_0(z_0|x) - \sum_k \log |\det J_{f_k}|

    Subclasses build ``self.flows`` (conditional transforms taking the context h(x) ``(B, C)``)
    and may override :meth:`transforms`; ``forward`` returns a ``TransformedDistribution``
    with batch ``(B,)`` and event ``(D,)``. Maps without an analytic inverse score only
    their own samples, which is what training and evaluation do.

    Args:
        data_dim: Number of pixels P.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder trunk; the last one is the context size C.
        num_flows: Number of maps K, at least 1.
        flow_hidden_dims: Hidden widths of each map's network; default ``(10 * D,)``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_dim, latent_dim, hidden_dims)
        self.num_flows = check_positive_int("num_flows", num_flows)
        default = (10 * latent_dim,)
        self.flow_hidden_dims = check_hidden_dims(
            default if flow_hidden_dims is None else flow_hidden_dims
        )
        self.flows = nn.ModuleList()

    def transforms(self, h: Tensor) -> list[Transform]:
        """The maps f_1..f_K conditioned on the context h(x) ``(B, C)``."""
        return [flow.condition(h) for flow in self.flows]

    def forward(self, x: Tensor) -> Distribution:
        base, h = self.diagonal_normal(x)  # base: batch (B,), event (D,); h: (B, C)
        return dist.TransformedDistribution(base, self.transforms(h))
