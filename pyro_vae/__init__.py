"""pyro_vae: variational autoencoders in Pyro with swappable amortized posteriors."""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .data import Dataset, DataSpec, load_dataset  # noqa: E402
from .evaluate import Evaluation, elbo, evaluate, log_likelihood  # noqa: E402
from .guides import (  # noqa: E402
    GUIDES,
    AmortizedGuide,
    LowRankNormalGuide,  # noqa: E402
    make_guide,
    register_guide,
)
from .model import VAE, VAEConfig  # noqa: E402
from .priors import PRIORS, make_prior, register_prior  # noqa: E402
from .train import TrainConfig, fit  # noqa: E402

__all__ = [
    "GUIDES",
    "PRIORS",
    "VAE",
    "AmortizedGuide",
    "DataSpec",
    "Dataset",
    "Evaluation",
    "LowRankNormalGuide",
    "TrainConfig",
    "VAEConfig",
    "__version__",
    "elbo",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_dataset",
    "log_likelihood",
    "make_guide",
    "make_prior",
    "register_guide",
    "register_prior",
    "save_checkpoint",
]
