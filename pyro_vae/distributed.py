"""Data-parallel training with torch.distributed: the ELBO as a module, replicas and shards."""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import pyro
import torch
import torch.distributed as torch_dist
from pyro.infer import ELBO, JitTrace_ELBO
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .data import minibatches
from .model import VAE
from .objectives import scale_latent

__all__ = [
    "DistributedReplica",
    "ELBOLoss",
    "Replica",
    "finish_worker",
    "init_replica",
    "is_launched",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ELBOLoss(nn.Module):
    """The negative ELBO of ``vae`` as a module; the unit that DistributedDataParallel wraps.

    ``forward(x, num_data, subsample, condition)`` returns the scalar loss: minus the ELBO
    estimate of all ``num_data`` images from the batch x ``(B, P)`` whose indices in the
    dataset are ``subsample`` ``(B,)`` (default: the first B); ``condition`` ``(B, C)``
    conditions a conditional VAE.

    ``beta`` (default 1) weights the latent sites ``vae.latent_sites`` in both model and guide
    through :class:`~pyro_vae.objectives.scale_latent`: the loss is then
    ``-(E_q log p(x|z) - beta * E_q[log q(z|x) - log p(z)])`` (KL warm-up). With a
    ``JitTrace_ELBO``, beta, the subsample and the condition enter the compiled graph as
    tensors, so one graph per batch size serves every epoch of a warm-up.

    Args:
        vae: The model and guide.
        elbo: A Pyro ELBO, e.g. ``Trace_ELBO(max_plate_nesting=1)``.
    """

    def __init__(self, vae: VAE, elbo: ELBO) -> None:
        super().__init__()
        self.vae, self.elbo = vae, elbo
        self.beta, self._sites = 1.0, vae.latent_sites
        # bound once: JitTrace_ELBO keys its compiled graph on id(model) and id(guide)
        self._model, self._guide = vae.model, vae.guide
        self._weighted_model = _weighted(vae.model, self._sites)
        self._weighted_guide = _weighted(vae.guide, self._sites)
        self._param_state: dict | None = None
        self._traced: set[tuple] = set()  # the keys of the compiled graphs
        self._beta_cache: tuple[tuple, Tensor] | None = None

    def forward(
        self,
        x: Tensor,
        num_data: int | None = None,
        subsample: Tensor | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        kwargs = {} if num_data is None else {"num_data": num_data}
        if subsample is not None:
            kwargs["subsample"] = subsample
        if condition is not None:
            kwargs["condition"] = condition
        if not isinstance(self.elbo, JitTrace_ELBO):
            weight = nullcontext() if self.beta == 1.0 else scale_latent(self._sites, self.beta)
            # the optimizer holds this module's parameters: no param statements needed
            with weight, self.vae.without_param_statements():
                return self.elbo.differentiable_loss(self._model, self._guide, x, **kwargs)
        # tensors enter the compiled graph as inputs; other arguments are fixed in it
        names = tuple(name for name in ("subsample", "condition") if name in kwargs)
        tensors = tuple(kwargs.pop(name) for name in names)
        beta = self._beta_tensor(x)
        kwargs["tensor_names"] = names
        kwargs["batch_size"] = x.shape[0]  # one compiled graph per batch size
        # the compiled graph reads parameters from the param store: give it this VAE's own
        # store, so an earlier module registered under the same names is never trained instead
        # (also under torchrun, whose module-local parameters would hide them from the store);
        # the plain graph interpreter: the optimizing executor's backward is slower on CPU
        with (
            pyro.settings.context(module_local_params=False),
            pyro.get_param_store().scope(self._param_state) as state,
            warnings.catch_warnings(),
            torch.jit.optimized_execution(False),
        ):
            warnings.filterwarnings("ignore", ".*torch.jit.trace.*", DeprecationWarning)
            self._param_state = state
            args = (self._weighted_model, self._weighted_guide, x, beta, *tensors)
            key = (len(tensors), *sorted(kwargs.items()))
            if key not in self._traced:
                # tracing runs the program twice more (the param capture, the trace): with the
                # random state restored after it, the compiled step draws what eager would
                devices = [x.device] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices):
                    self.elbo.loss_and_surrogate_loss(*args, **kwargs)
                self._traced.add(key)
            loss, surrogate = self.elbo.loss_and_surrogate_loss(*args, **kwargs)
        # value of the loss, gradient of the surrogate: JitTrace_ELBO.differentiable_loss
        # (pyro 1.9) returns loss + (surrogate - surrogate.detach()), which doubles the
        # gradient of every reparameterized site
        return loss.detach() + (surrogate - surrogate.detach())

    def _beta_tensor(self, x: Tensor) -> Tensor:
        """``beta`` as a 0-dim tensor of x's dtype and device, made once per value (a new
        tensor on a GPU each step would copy from the host each step)."""
        key = (float(self.beta), x.dtype, x.device)
        if self._beta_cache is None or self._beta_cache[0] != key:
            self._beta_cache = (key, torch.tensor(key[0], dtype=x.dtype, device=x.device))
        return self._beta_cache[1]


def _weighted(program: Callable[..., Any], sites: Sequence[str]) -> Callable[..., Any]:
    """``program(x, **kwargs)`` with its latent ``sites`` weighted by a tensor ``beta`` and
    the tensors named in ``tensor_names`` passed positionally (for ``JitTrace_ELBO``)."""

    def weighted(
        x: Tensor, beta: Tensor, *tensors: Tensor, tensor_names: tuple[str, ...] = (), **kwargs
    ) -> Any:  # noqa: ANN401
        with scale_latent(sites, beta):
            return program(x, **kwargs, **dict(zip(tensor_names, tensors, strict=True)))

    return weighted


class Replica:
    """One training process that holds all of the data: rank 0 of 1 (the default)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, metrics and progress."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to call for the loss (here: itself)."""
        return module

    def batches(
        self,
        num_data: int,
        batch_size: int,
        generator: torch.Generator,
        epoch: int,
        device: torch.device | str,
    ) -> Iterator[Tensor]:
        """Index tensors ``(B,)`` of this process's minibatches for ``epoch`` (from 1)."""
        return minibatches(num_data, batch_size, generator, device)

    def num_batches(self, num_data: int, batch_size: int) -> int:
        """Minibatches per epoch on this process."""
        return _ceil_div(num_data, batch_size)

    def shard(self, x: Tensor) -> Tensor:
        """This process's share of the rows of x, for evaluation."""
        return x

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over processes."""
        return value

    def subsample(self, index: Tensor) -> Tensor | None:
        """The ``subsample`` argument of the loss for a batch at ``index`` (None: implicit)."""
        return None

    def gather(self, value: Any) -> list[Any] | None:  # noqa: ANN401
        """Every process's ``value``, by rank, on rank 0 (None elsewhere); a collective."""
        return [value]


class DistributedReplica(Replica):
    """One of ``world_size`` processes in an initialized default process group.

    Each epoch the dataset is shuffled with the same seed on every rank and split into
    disjoint shards (:class:`~torch.utils.data.DistributedSampler` with ``set_epoch``;
    the last images repeat to even out the shards). The data plate keeps the global size and
    gets the rank's indices as subsample, so every rank estimates the ELBO of the whole
    dataset and the averaged gradient is that of one large batch.

    Args:
        device: This rank's device (``cuda:LOCAL_RANK`` with NCCL).
    """

    def __init__(self, device: torch.device) -> None:
        if not torch_dist.is_initialized():
            raise RuntimeError("call torch.distributed.init_process_group first")
        self.rank, self.world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        self.device = torch.device(device)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``DistributedDataParallel(module)``: rank 0's parameters are broadcast now, and
        gradients are averaged over ranks in every backward pass."""
        ids = [self.device] if self.device.type == "cuda" else None
        # the buffers (prior, index tables) are constants: sync them at init only
        name = "forward_sync_buffers"  # torch >= 2.13; earlier: broadcast_buffers
        if name not in inspect.signature(DistributedDataParallel).parameters:
            name = "broadcast_buffers"
        return DistributedDataParallel(module, device_ids=ids, **{name: False})

    def _sampler(self, num_data: int, seed: int, epoch: int) -> DistributedSampler:
        sampler = DistributedSampler(
            range(num_data), self.world_size, self.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        return sampler

    def batches(
        self,
        num_data: int,
        batch_size: int,
        generator: torch.Generator,
        epoch: int,
        device: torch.device | str,
    ) -> Iterator[Tensor]:
        seed = int(torch.randint(2**31, (), generator=generator))  # same on every rank
        index = torch.tensor(list(self._sampler(num_data, seed, epoch)), device=device)
        return iter(index.split(batch_size))

    def num_batches(self, num_data: int, batch_size: int) -> int:
        return _ceil_div(_ceil_div(num_data, self.world_size), batch_size)

    def shard(self, x: Tensor) -> Tensor:
        return x[self.rank :: self.world_size]

    def sum(self, value: Tensor) -> Tensor:
        value = value.clone()
        torch_dist.all_reduce(value)
        return value

    def subsample(self, index: Tensor) -> Tensor | None:
        return index

    def gather(self, value: Any) -> list[Any] | None:  # noqa: ANN401
        out = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(value, out, dst=0)
        return out


def is_launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with peers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_replica(device: torch.device) -> tuple[Replica, torch.device]:
    """Join the process group that ``torchrun`` describes, or return a single Replica.

    Uses NCCL for CUDA devices (one GPU per local rank) and gloo otherwise, and switches
    Pyro to module-local parameters (which DistributedDataParallel needs) before any module
    is built. Returns the replica and this rank's device.
    """
    if not is_launched():
        return Replica(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # torchrun keeps its store across restarts (--max-restarts): the keys of an earlier
    # attempt (e.g. a dead rank's gloo address) must not be read, so each attempt gets its own
    store, rank, world_size = next(torch_dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch_dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=torch_dist.PrefixStore(f"pyro_vae/attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
    )
    pyro.settings.set(module_local_params=True)
    return DistributedReplica(device), device


def finish_worker(code: int) -> int:
    """Leave the process group and end the process with ``code``; returns ``code`` if none.

    With torch 2.13 and gloo a worker occasionally aborts at interpreter exit after all work
    is done; tearing the group down, flushing and exiting at once avoids it.
    """
    if not torch_dist.is_initialized():
        return code
    torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
