"""pyro_vae: variational autoencoders in Pyro, assembled from registered parts."""

from __future__ import annotations

__version__ = "0.1.0"

from .callbacks import Callback, TensorBoardCallback  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .data import DATASETS, Dataset, DataSpec, load_dataset, register_dataset  # noqa: E402
from .evaluate import Evaluation, elbo, evaluate, log_likelihood  # noqa: E402
from .guides import (  # noqa: E402
    GUIDES,
    AmortizedGuide,
    LowRankNormalGuide,  # noqa: E402
    make_guide,
    register_guide,
)
from .likelihoods import (  # noqa: E402
    LIKELIHOODS,
    Likelihood,
    make_likelihood,
    register_likelihood,
)
from .model import VAE, ModelDraw, VAEConfig  # noqa: E402
from .networks import ARCHS, NetworkPair, make_arch, register_arch  # noqa: E402
from .priors import PRIORS, make_prior, register_prior  # noqa: E402
from .run_dir import RunDir  # noqa: E402
from .runs import Run, load_run  # noqa: E402
from .train import TrainConfig, fit  # noqa: E402

__all__ = [
    "ARCHS",
    "DATASETS",
    "GUIDES",
    "LIKELIHOODS",
    "PRIORS",
    "Run",
    "RunDir",
    "VAE",
    "AmortizedGuide",
    "Callback",
    "DataSpec",
    "Dataset",
    "Evaluation",
    "Likelihood",
    "LowRankNormalGuide",
    "ModelDraw",
    "NetworkPair",
    "TensorBoardCallback",
    "TrainConfig",
    "VAEConfig",
    "__version__",
    "elbo",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_dataset",
    "load_run",
    "log_likelihood",
    "make_arch",
    "make_guide",
    "make_likelihood",
    "make_prior",
    "register_arch",
    "register_dataset",
    "register_guide",
    "register_likelihood",
    "register_prior",
    "save_checkpoint",
]
