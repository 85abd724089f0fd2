"""One rank of the data-parallel check; launched by test_distributed.py through torchrun.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py RESULTS.json``.
Rank 0 writes what the test asserts on: parameter agreement, synchronized versus per-rank
gradients, and the 2-rank loss against a 1-process run on the union of the batches, for a
data plate sized to the whole dataset ("global") and to one rank's share ("per-rank").
"""

from __future__ import annotations

import json
import sys

import pyro
import torch
import torch.distributed as torch_dist
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_vae import VAE, VAEConfig
from pyro_vae.distributed import DistributedReplica, ELBOLoss, finish_worker, init_replica

NUM_DATA, BATCH = 16, 4
CONFIG = VAEConfig(6, 2, (5,), "diagonal")


class FixedNoise(Messenger):
    """Draw the guide's z as loc + scale * eps[i] for datapoint i: noise fixed per image."""

    def __init__(self, eps: Tensor, index: Tensor) -> None:
        super().__init__()
        self.eps, self.index = eps, index

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] == "vae.z" and msg["value"] is None and not msg["is_observed"]:
            normal = msg["fn"].base_dist
            msg["value"] = normal.loc + normal.scale * self.eps[self.index]


def gather(value: Tensor) -> list[Tensor]:
    out = [torch.empty_like(value) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(out, value.contiguous())
    return out


def flat_grad(loss: Tensor, vae: VAE) -> Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(vae.parameters()))])


def compiled_against_eager(
    replica: DistributedReplica, vae: VAE, data: Tensor, eps: Tensor, index: Tensor
) -> dict:
    """The DDP-wrapped compiled loss (JitTrace_ELBO) against the DDP-wrapped eager loss, on
    two copies of the same weights with the same noise; gradients after the all-reduce."""
    results = {}
    for name, elbo in (
        ("eager", Trace_ELBO(max_plate_nesting=1)),
        ("jit", JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)),
    ):
        copy = VAE(CONFIG)
        copy.load_state_dict(vae.state_dict())
        module = replica.wrap(ELBOLoss(copy, elbo))
        module.module.beta = 0.5  # a KL warm-up's weight reaches both
        for _ in range(2):  # the compiled graph is traced at the first call
            copy.zero_grad(set_to_none=True)
            with FixedNoise(eps, index):
                loss = module(data[index], NUM_DATA, replica.subsample(index))
            loss.backward()
        grad = torch.cat([p.grad.flatten() for p in copy.parameters()])
        results[name] = (loss.detach(), grad, gather(grad))
    (eager_loss, eager_grad, _), (jit_loss, jit_grad, jit_grads) = results["eager"], results["jit"]
    return {
        "loss_relative_difference": float((jit_loss - eager_loss).abs() / eager_loss.abs()),
        "grad_max_difference": float((jit_grad - eager_grad).abs().max()),
        "max_abs_grad": float(eager_grad.abs().max()),
        "jit_synced_identical_on_ranks": all(torch.equal(jit_grads[0], g) for g in jit_grads),
    }


def main(path: str) -> None:
    torch.set_default_dtype(torch.float64)
    replica, _ = init_replica(torch.device("cpu"))
    pyro.set_rng_seed(100 + replica.rank)  # different initial weights on purpose
    vae = VAE(CONFIG)
    before = gather(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    loss_module = ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))
    ddp = replica.wrap(loss_module)  # broadcasts rank 0's weights
    after = gather(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    generator = torch.Generator().manual_seed(0)  # the same data and noise table everywhere
    data = torch.bernoulli(torch.full((NUM_DATA, 6), 0.5), generator=generator)
    eps = torch.randn(NUM_DATA, 2, generator=generator)
    shards = gather(torch.cat(list(replica.batches(NUM_DATA, BATCH, generator, 1, "cpu"))))
    index = next(replica.batches(NUM_DATA, BATCH, torch.Generator().manual_seed(0), 1, "cpu"))
    union = torch.cat(gather(index))
    reference = VAE(CONFIG)  # the 1-process run: same weights, batch = union of the ranks'
    reference.load_state_dict(vae.state_dict())
    with FixedNoise(eps, union):
        ref_module = ELBOLoss(reference, Trace_ELBO(max_plate_nesting=1))
        ref_loss = ref_module(data[union], NUM_DATA, union)
    ref_grad = flat_grad(ref_loss, reference)
    results = {
        "world_size": replica.world_size,
        "init_differed": not torch.equal(before[0], before[1]),
        "params_identical": all(torch.equal(after[0], p) for p in after),
        "shards": [s.tolist() for s in shards],
        "reference_loss_per_datapoint": float(ref_loss) / NUM_DATA,
    }
    for mode, num_data in (("global", NUM_DATA), ("per-rank", NUM_DATA // replica.world_size)):
        with FixedNoise(eps, index):
            own = flat_grad(loss_module(data[index], num_data, index), vae)
            loss = ddp(data[index], num_data, replica.subsample(index))  # through the wrapper
        vae.zero_grad(set_to_none=True)
        loss.backward()  # all-reduces the gradients
        synced = torch.cat([p.grad.flatten() for p in vae.parameters()])
        vae.zero_grad(set_to_none=True)
        owns, synceds, losses = gather(own), gather(synced), gather(loss.detach().reshape(1))
        mean_own = torch.stack(owns).mean(0)
        results[mode] = {
            "synced_identical_on_ranks": all(torch.equal(synceds[0], g) for g in synceds),
            "synced_equals_mean_of_own": torch.equal(synced, mean_own),
            "own_gradients_differ": not torch.equal(owns[0], owns[1]),
            "loss_per_datapoint": float(torch.cat(losses).mean()) / NUM_DATA,
            "max_grad_difference_to_reference": float((synced - ref_grad).abs().max()),
            "max_abs_reference_grad": float(ref_grad.abs().max()),
        }
    results["compiled"] = compiled_against_eager(replica, vae, data, eps, index)
    if replica.is_main:
        with open(path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    finish_worker(0)
