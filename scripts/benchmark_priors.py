"""Benchmark: IS log p(x) of the standard, mixture and Vamp priors at an equal training budget.

Each prior gets the same networks, guide, epochs, seed and number of importance samples.
The last ``--num-select`` validation images give the per-epoch validation ELBO; IS log p(x)
of the model after the last epoch is measured on the first ``--num-eval`` validation images
(disjoint). One JSON line per run is appended to ``--out``.

Example::

    python scripts/benchmark_priors.py --data /path/binarized_mnist.npz --priors standard vamp
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, Dataset, DataSpec, TrainConfig, VAEConfig, evaluate, fit, load_dataset
from pyro_vae.priors import PRIORS


def run_one(
    data: Dataset,
    prior: str,
    args: argparse.Namespace,
    prior_options: dict[str, int] | None = None,
) -> dict[str, float | int | str]:
    """Train one VAE with ``prior`` and return its validation IS log p(x) and timings."""
    pyro.set_rng_seed(args.seed)
    select = replace(
        data, valid=data.valid[-args.num_select :], test=None, valid_labels=None, test_labels=None
    )
    config = VAEConfig(
        data.data_dim,
        args.latent_dim,
        tuple(args.hidden_dims),
        args.guide,
        image_shape=data.image_shape,
        prior=prior,
        prior_options=prior_options or {},
    )
    vae = VAE(config)
    start = time.perf_counter()
    history = fit(
        vae,
        select,
        TrainConfig(args.epochs, args.batch_size, args.lr, seed=args.seed),
        progress=False,
    )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(
        vae.eval(),
        data.split("valid")[: args.num_eval],
        num_samples=args.num_samples,
        max_elements=2**22,
    )
    return {
        "prior": prior,
        **(prior_options or {}),
        "seed": args.seed,
        "epochs": args.epochs,
        "final_valid_elbo": history[-1]["valid_elbo"],
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.to_dict().items()},
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="binarized MNIST .npz")
    parser.add_argument(
        "--priors", nargs="+", choices=sorted(PRIORS), default=["standard", "vamp"]
    )
    parser.add_argument("--num-components", type=int, default=500)
    parser.add_argument("--guide", default="diagonal")
    parser.add_argument("--latent-dim", type=int, default=40)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[300])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=None, help="use the first N images")
    parser.add_argument("--num-select", type=int, default=1000)
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmark_priors.jsonl"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = DataSpec("digits") if args.data is None else DataSpec("binarized-mnist", str(args.data))
    data = load_dataset(spec)
    if args.num_train is not None:
        data = data.first_train(args.num_train)
    if args.num_select + args.num_eval > data.valid.shape[0]:
        raise SystemExit("--num-select + --num-eval exceed the validation split")
    for prior in args.priors:
        options = {"num_components": args.num_components} if prior != "standard" else None
        row = run_one(data, prior, args, options)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
