"""Inpainting: condition a trained VAE on the top half of each image and fill in the bottom.

The VAE's model is conditioned on the observed pixels with ``poutine.condition`` on its
masked likelihood (``vae.model(batch_size=n, mask=m)`` scores only the pixels where m is
True); z is inferred by a short SVI with a local Gaussian guide per image while the VAE's own
weights are hidden from the optimizer with ``poutine.block``. The bottom half is filled with
the posterior mean of the pixel probabilities. Saves a picture with three rows (observed,
filled-in, true) and reports the accuracy of the filled-in pixels next to a baseline that
fills each pixel with its training-set mean.

Example::

    python scripts/inpainting.py --out inpainting.png          # trains a digits VAE first
    python scripts/inpainting.py --run-dir runs/digits-full      # or uses a trained run
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

from pyro_vae import VAE, DataSpec, TrainConfig, VAEConfig, fit, load_checkpoint, load_dataset
from pyro_vae.pictures import save_image_grid
from pyro_vae.run_dir import RunDir


def top_half_mask(image_shape: tuple[int, int]) -> Tensor:
    """True on the top half of the rows, ``(P,)`` bool."""
    h, w = image_shape
    return (torch.arange(h * w) // w) < h // 2


def infer_latents(
    vae: VAE, x: Tensor, mask: Tensor, num_steps: int = 300, lr: float = 0.05
) -> dist.Distribution:
    """q(z) ``(n,)`` x ``(D,)`` fitted to p(z | observed pixels) by SVI; the VAE stays fixed."""
    n, prefix = x.shape[0], vae.prefix
    observed = torch.where(mask, x, torch.zeros_like(x))  # unobserved values are never scored
    model = poutine.block(
        poutine.condition(vae.model, data={f"{prefix}.x": observed}), hide_types=["param"]
    )
    with torch.no_grad():
        start = vae.encoder.diagonal_normal(observed)[0].mean  # amortized guess as the start

    def guide(batch_size: int, mask: Tensor) -> None:
        loc = pyro.param("inpaint.loc", start.clone())
        scale = pyro.param(
            "inpaint.scale", torch.full_like(start, 0.3), constraint=dist.constraints.positive
        )
        with pyro.plate(f"{prefix}.data", batch_size, dim=-1):
            pyro.sample(f"{prefix}.z", dist.Normal(loc, scale).to_event(1))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    for _ in range(num_steps):
        svi.step(batch_size=n, mask=mask.expand(n, -1))
    return dist.Normal(pyro.param("inpaint.loc"), pyro.param("inpaint.scale")).to_event(1)


def run(
    vae: VAE,
    x: Tensor,
    train: Tensor,
    out: Path | None = None,
    num_steps: int = 300,
    num_draws: int = 64,
) -> dict[str, float | int]:
    """Fill the bottom half of ``x`` ``(n, P)``; optionally save the picture to ``out``."""
    mask = top_half_mask(vae.config.image_shape)
    posterior = infer_latents(vae, x, mask, num_steps)
    with torch.no_grad():
        probs = vae.decode(posterior.sample((num_draws,))).mean(0)  # (n, P)
    filled = torch.where(mask, x, probs)
    missing = ~mask
    baseline = train.mean(0).expand_as(x)
    result = {
        "num_images": x.shape[0],
        "missing_pixels_per_image": int(missing.sum()),
        "filled_accuracy": float(((probs > 0.5) == x.bool())[:, missing].float().mean()),
        "pixel_mean_accuracy": float(((baseline > 0.5) == x.bool())[:, missing].float().mean()),
    }
    if out is not None:
        shown = torch.where(mask, x, torch.full_like(x, 0.5))
        save_image_grid(out, torch.stack([shown, filled, x]), vae.config.image_shape)
        result["picture"] = str(out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a trained pyro-vae run")
    parser.add_argument("--epochs", type=int, default=200, help="training epochs without a run")
    parser.add_argument("--num-images", type=int, default=10)
    parser.add_argument("--num-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("inpainting.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    data = load_dataset(DataSpec("digits"))
    if args.run_dir is not None:
        vae, _ = load_checkpoint(RunDir(args.run_dir).checkpoint)
    else:
        vae = VAE(VAEConfig(data.data_dim, 8, (200,), "diagonal", image_shape=data.image_shape))
        fit(vae, data, TrainConfig(num_epochs=args.epochs, seed=args.seed), progress=False)
    vae.eval()
    test, train = data.split("test")[: args.num_images], data.split("train")
    print(json.dumps(run(vae, test, train, args.out, args.num_steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
