"""Tiny synthetic data, models, run folders and training loops shared by the tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from torch import Tensor

from pyro_vae.data import Dataset
from pyro_vae.distributed import ELBOLoss
from pyro_vae.model import VAE, VAEConfig
from pyro_vae.train import TrainConfig, fit

PIXELS = 12


def tiny_data(dynamic: bool = True, seed: int = 0) -> Dataset:
    """48 train / 12 valid images of 12 pixels; train holds intensities when ``dynamic``."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(60, PIXELS, generator=g)
    train = probs[:48] if dynamic else torch.bernoulli(probs[:48], generator=g)
    valid = torch.bernoulli(probs[48:], generator=g)
    return Dataset(train, valid, None, (3, 4), dynamic=dynamic)


def tiny_vae(seed: int = 0) -> VAE:
    """A diagonal-guide VAE with D = 2 and one hidden layer of 8, initialized from ``seed``."""
    pyro.set_rng_seed(seed)
    return VAE(VAEConfig(PIXELS, 2, (8,), "diagonal"))


def tiny_config(num_epochs: int, **changes: object) -> TrainConfig:
    return TrainConfig(num_epochs=num_epochs, batch_size=16, seed=3, log_every=2, **changes)


def train_tiny(run_dir: Path | None, num_epochs: int, **changes: object) -> tuple[VAE, list]:
    """Seeded like the CLI: one seed for Pyro and initialization, then ``fit``."""
    vae = tiny_vae()
    history = fit(vae, tiny_data(), tiny_config(num_epochs, **changes), run_dir, progress=False)
    return vae, history


def save_binary_npy(path: Path, num_images: int = 40, pixels: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.save(path, (rng.random((num_images, pixels)) < 0.3).astype(np.float32))
    return path


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def cli_train(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    """``pyro-vae train`` arguments for a tiny diagonal-guide run on ``data``."""
    return [
        "train", "--data", str(data), "--epochs", str(epochs), "--batch-size", "8",
        "--latent-dim", "2", "--hidden-dims", "8", "--guide", "diagonal", "--seed", "4",
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def adam_losses(vae: VAE, x: Tensor, steps: int, lr: float) -> list[float]:
    """Train ``vae`` on the whole batch ``x`` with Adam for ``steps``; the -ELBO of each step."""
    loss = Trace_ELBO().differentiable_loss
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(vae.model, vae.guide, x)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    return losses


def assert_jit_equals_eager(
    vae: VAE,
    x: Tensor,
    num_data: int = 50,
    betas: tuple[float, ...] = (1.0,),
    subsample: Tensor | None = None,
    condition: Tensor | None = None,
    elbos: tuple[type, type] = (Trace_ELBO, JitTrace_ELBO),
) -> None:
    """The compiled loss and its gradients equal the eager ones on the same noise draws,
    for the batch x and a smaller one (each batch size gets its own graph), at every KL
    weight in ``betas`` (one graph serves them all), with the optional ``subsample`` ``(B,)``
    and ``condition`` ``(B, C)`` rows of x, after the weights have changed since tracing.
    ``elbos``: the eager ELBO class and its compiled twin."""
    eager = ELBOLoss(vae, elbos[0](max_plate_nesting=1))
    compiled = ELBOLoss(vae, elbos[1](max_plate_nesting=1, ignore_jit_warnings=True))
    for n, beta in itertools.product((x.shape[0], max(1, x.shape[0] // 2)), betas):
        rows = {
            name: value[:n]
            for name, value in (("subsample", subsample), ("condition", condition))
            if value is not None
        }
        compiled.beta = eager.beta = 1.0
        compiled(x[:n], num_data, **rows)  # compile
        compiled.beta = eager.beta = beta
        with torch.no_grad():  # new weights: a value frozen into the graph would show
            for parameter in vae.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        results = []
        for loss_fn in (compiled, eager):
            torch.manual_seed(1)  # the same noise draws
            loss = loss_fn(x[:n], num_data, **rows)
            results.append((loss, torch.autograd.grad(loss, list(vae.parameters()))))
        (loss_jit, grads_jit), (loss_eager, grads_eager) = results
        assert torch.allclose(loss_jit, loss_eager, rtol=1e-12, atol=0)
        for a, b in zip(grads_jit, grads_eager, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
