"""A VAE nested in a larger model: a latent per digit class, shared by that class's images.

.. math:: c_g \\sim \\mathcal{N}(0, I), \\quad z_{gi} \\sim \\mathcal{N}(c_g, s^2 I), \\quad
          x_{gi} \\sim p_\\theta(x | z_{gi}) \\qquad g = 1..G \\text{ classes}, i = 1..B

The VAE's own model runs unchanged inside the outer plate ``nested.classes`` (dim -2); its
data plate is dim -1, so images come as ``(G, B, P)`` and z as ``(G, B, D)``. Its p(z) is
replaced per call by N(c_g, s^2 I) (``vae.model(x, prior=...)``). The guide is q(c_g) (a
Gaussian per class) times the VAE's amortized q(z | x); one ``SVI`` with
``Trace_ELBO(max_plate_nesting=2)`` trains everything. Reports how well the learned class
latents separate the classes (test images assigned to the nearest c_g by the density of their
posterior mean) and saves samples decoded from z ~ N(c_g, s^2 I), one row per class.

Example::

    python scripts/nested_model.py --num-steps 1500 --out nested_samples.png
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

from pyro_vae import VAE, VAEConfig
from pyro_vae.pictures import save_image_grid


class ClassLatentModel:
    """Model and guide of the nested program; both take images ``(G, B, P)``.

    Args:
        vae: The VAE whose model and guide run inside the class plate.
        num_classes: G.
        images_per_class: Dataset images per class, to scale the minibatch ELBO.
    """

    def __init__(self, vae: VAE, num_classes: int, images_per_class: int) -> None:
        self.vae, self.num_classes, self.images_per_class = vae, num_classes, images_per_class
        self.latent_dim = vae.config.latent_dim

    def class_plate(self) -> pyro.plate:
        return pyro.plate("nested.classes", self.num_classes, dim=-2)

    def model(self, x: Tensor) -> None:
        spread = pyro.param(
            "nested.spread", x.new_tensor(0.5), constraint=dist.constraints.positive
        )
        with self.class_plate():
            c = pyro.sample("nested.c", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            prior = dist.Normal(c, spread).to_event(1)  # batch (G, 1), broadcast over images
            self.vae.model(x, num_data=self.images_per_class, prior=prior)

    def guide(self, x: Tensor) -> None:
        shape = (self.num_classes, 1, self.latent_dim)
        loc = pyro.param("nested.c_loc", 0.1 * torch.randn(shape))
        scale = pyro.param(
            "nested.c_scale", torch.full(shape, 0.1), constraint=dist.constraints.positive
        )
        with self.class_plate():
            pyro.sample("nested.c", dist.Normal(loc, scale).to_event(1))
            self.vae.guide(x, num_data=self.images_per_class)


def load_digits_with_labels(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 8x8 digits thresholded at 0.5: train x ``(1497, 64)``, y, test x (300), y."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0 >= 0.5, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[300:]], y[order[300:]], x[order[:300]], y[order[:300]]


def run(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    image_shape: tuple[int, int],
    num_steps: int = 1500,
    images_per_step: int = 16,
    latent_dim: int = 8,
    seed: int = 0,
    out: Path | None = None,
) -> dict[str, float | int | str]:
    """Train the nested model by SVI; returns nearest-class accuracy and the final loss."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    classes = sorted(set(y_train.tolist()))
    members = [torch.nonzero(y_train == g).squeeze(-1) for g in classes]
    vae = VAE(VAEConfig(x_train.shape[1], latent_dim, (200,), "diagonal", image_shape=image_shape))
    nested = ClassLatentModel(vae, len(classes), len(x_train) // len(classes))
    svi = SVI(
        nested.model, nested.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(max_plate_nesting=2)
    )
    start, losses = time.perf_counter(), []
    for _ in range(num_steps):
        picks = [m[torch.randint(len(m), (images_per_step,))] for m in members]
        losses.append(svi.step(x_train[torch.stack(picks)]))  # x: (G, B, P)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        centers, spread = pyro.param("nested.c_loc").squeeze(1), pyro.param("nested.spread")
        z = vae.encoder.diagonal_normal(x_test)[0].mean  # (N, D)
        log_p = dist.Normal(centers, spread).to_event(1).log_prob(z.unsqueeze(-2))  # (N, G)
        predicted = torch.tensor(classes)[log_p.argmax(-1)]
    result = {
        "nearest_class_accuracy": float((predicted == y_test).float().mean()),
        "spread": float(spread),
        "final_loss_per_image": sum(losses[-50:]) / 50 / len(x_train),
        "num_steps": num_steps,
        "train_seconds": round(seconds, 1),
    }
    if out is not None:
        with torch.no_grad():
            z = dist.Normal(centers, spread).sample((8,)).transpose(0, 1)  # (G, 8, D)
            save_image_grid(out, vae.decode(z), image_shape)
        result["picture"] = str(out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("nested_samples.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_with_labels()
    result = run(
        x_train, y_train, x_test, y_test, (8, 8), args.num_steps, seed=args.seed, out=args.out
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
