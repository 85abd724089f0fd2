"""What several commands share: devices, data specs, guide options, resumed settings."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_payload
from ..compare import CompareConfig
from ..data import DATASETS, Dataset, DataSpec
from ..guides import GUIDES, FlowGuide
from ..likelihoods import LIKELIHOODS
from ..model import VAEConfig
from ..run_dir import RunDir
from ..runs import (
    read_run,
)
from ..train import (
    TrainConfig,
)
from .arguments import (
    RESUME_FLAGS,
    UsageError,
    _flow_guides,
    _given_train_options,
    _train_config,
    build_parser,
)

# ---------------------------------------------------------------- helpers


def guide_options(args: argparse.Namespace, key: str | None = None) -> dict[str, Any]:
    """``--guide-option`` pairs plus the flow flags (recorded only for flow guides).

    ``key`` is the guide they are for (default ``--guide``); ``compare`` asks for each guide
    it compares, and there the flow flags apply to its flow guides only.
    """
    key = args.guide if key is None else key
    options = dict(args.guide_option)
    flags = {"--num-flows": args.num_flows, "--flow-hidden-dims": args.flow_hidden_dims}
    if not issubclass(GUIDES[key], FlowGuide):
        given = [flag for flag, value in flags.items() if value is not None]
        if given and args.command == "train":
            raise UsageError(
                f"{given[0]} applies to the flow guides ({', '.join(_flow_guides())}), "
                f"not to --guide {key}"
            )
        return options
    if args.num_flows is not None or "num_flows" not in options:
        options["num_flows"] = args.num_flows or 4
    if args.flow_hidden_dims is not None:
        options["flow_hidden_dims"] = list(args.flow_hidden_dims)
    return options


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; an unavailable CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


def data_spec(
    values: Sequence[str], binarize: str | None, seed: int = 0, likelihood: str = "bernoulli"
) -> DataSpec:
    """``--data NAME [PATH]`` (or ``--data FILE.npy``) as a DataSpec, in the pixel kind of
    ``likelihood``; ``--binarize`` fits only a likelihood of binary pixels."""
    pixels = LIKELIHOODS[likelihood].pixels
    if binarize is not None and pixels != "binary":
        raise UsageError(
            f"--binarize and --likelihood {likelihood} do not fit: the likelihood scores "
            f"{pixels} pixels, not binarized ones"
        )
    if len(values) > 2:
        raise UsageError(f"--data takes NAME [PATH], got {' '.join(values)}")
    name, path = values[0], (values[1] if len(values) == 2 else None)
    if name not in DATASETS and path is None and Path(name).suffix in (".npy", ".npz"):
        name, path = "array", name
    if path is not None:
        path = str(Path(path).expanduser().resolve())
    return DataSpec(name, path, binarize, seed, pixels=pixels)


def _resume_settings(
    args: argparse.Namespace, check_flags: bool = True
) -> tuple[DataSpec, VAEConfig, TrainConfig]:
    """Data, model and training settings of the run in ``--resume RUN_DIR``.

    ``check_flags=False`` (a restarted torchrun worker, whose command line started the run):
    the run's settings apply and the other flags are not compared.
    """
    run_dir = args.resume
    if args.overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pass one")
    argv = getattr(args, "argv", None)  # set by main(); absent when called with a Namespace
    if not check_flags:
        given: set[str] = set()
    elif argv is not None:
        given = _given_train_options(argv) - {"command"}
    else:
        defaults = vars(build_parser().parse_args(["train"]))
        given = {key for key, value in vars(args).items() if value != defaults.get(key, value)}
    fixed = sorted(given - set(RESUME_FLAGS))
    if fixed:
        flags = ", ".join("--" + key.replace("_", "-") for key in fixed)
        raise UsageError(
            f"--resume {run_dir}: {flags} cannot change, the run's settings come from "
            f"{RunDir(run_dir).config}; only --epochs, --lr, --clip-norm, --device, --quiet apply"
        )
    run, folder = read_run(run_dir), RunDir(run_dir)
    if not folder.last.is_file():
        raise UsageError(
            f"--resume {run_dir}: no {folder.LAST} (no epoch finished); start again with "
            "--overwrite"
        )
    try:
        spec, config = DataSpec(**run["data"]), VAEConfig.from_dict(run["model"])
        stored = dict(run["train"])
        for key in ("epochs", "lr", "clip_norm"):
            if key in given:
                stored["num_epochs" if key == "epochs" else key] = getattr(args, key)
        train_config = TrainConfig(**stored)
    except (KeyError, TypeError, ValueError) as error:
        where = folder.config
        raise UsageError(f"{where}: not a usable run configuration ({error})") from None
    done = read_payload(folder.last).get("epoch")
    if not isinstance(done, int) or done >= train_config.num_epochs:
        raise UsageError(
            f"--resume {run_dir}: already trained {done!r} of {train_config.num_epochs} epochs; "
            "pass --epochs N with a larger N to train longer"
        )
    return spec, config, train_config


def _require_tensorboard() -> None:
    """UsageError (one line) unless TensorBoard's writer imports."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install 'pyro-vae[tensorboard]'"
        ) from None


def _num_classes(data: Dataset, spec: DataSpec) -> int:
    """The number of classes a conditional VAE is conditioned on; an error without labels."""
    if data.num_classes is None:
        raise UsageError(f"--conditional needs labels, and dataset {spec.name!r} has none")
    return data.num_classes


def model_config(args: argparse.Namespace, data: Dataset, spec: DataSpec) -> VAEConfig:
    """The VAEConfig that ``train`` flags describe for ``data``."""
    likelihood = LIKELIHOODS[args.likelihood]
    return VAEConfig(
        data.data_dim,
        args.latent_dim,
        args.hidden_dims,
        args.guide,
        guide_options(args),
        data.image_shape,
        arch=args.arch,
        prior=args.prior,
        prior_options=dict(args.prior_option),
        latent=args.latent,
        likelihood=args.likelihood,
        likelihood_options=likelihood.options_for_data(
            dict(args.likelihood_option), data.train, data.levels
        ),
        arch_options=dict(args.arch_option),
        latent_dims=args.latent_dims,
        inference=args.inference,
        layer_guides=args.layer_guides,
        decoder_input=args.decoder_input,
        condition_dim=_num_classes(data, spec) if args.conditional else 0,
    )


def compare_config(args: argparse.Namespace, data: Dataset) -> CompareConfig:
    """The CompareConfig that ``compare`` flags describe for ``data``."""
    likelihood_options = LIKELIHOODS[args.likelihood].options_for_data(
        dict(args.likelihood_option), data.train, data.levels
    )
    return CompareConfig(
        guides=args.guides,
        num_seeds=args.seeds if isinstance(args.seeds, int) else len(args.seeds),
        seeds=None if isinstance(args.seeds, int) else args.seeds,
        num_samples=args.num_samples,
        latent_dim=args.latent_dim,
        hidden_dims=args.hidden_dims,
        train=_train_config(args, seed=0),
        guide_options={key: guide_options(args, key) for key in args.guides},
        model_options={
            "arch": args.arch,
            "arch_options": dict(args.arch_option),
            "prior": args.prior,
            "prior_options": dict(args.prior_option),
            "latent": args.latent,
            "likelihood": args.likelihood,
            "likelihood_options": likelihood_options,
            "latent_dims": args.latent_dims,
            "inference": args.inference,
            "decoder_input": args.decoder_input,
        },
    )


#: How the start line names each objective.
_OBJECTIVE_WORDS = {"elbo": "ELBO", "meanfield": "mean-field ELBO", "iwae": "IWAE bound"}
#: How the start line names each gradient estimator other than the pathwise one.
_ESTIMATOR_WORDS = {"stl": "STL", "dreg": "DReG"}


def _recipe_words(args: argparse.Namespace, config: TrainConfig) -> str:
    """``", preset mnist-iwae, IWAE bound with K = 50, DReG gradient"``: the preset and what
    differs from a one-draw ELBO with the pathwise gradient (empty when nothing does)."""
    words = ""
    if getattr(args, "preset", None):
        words += f", preset {args.preset}"
    if config.objective != "elbo" or config.num_particles > 1:
        words += f", {_OBJECTIVE_WORDS.get(config.objective, config.objective)}"
        if config.objective == "iwae":
            words += f" with K = {config.num_particles}"
        elif config.num_particles > 1:
            words += f" with {config.num_particles} draws"
    if config.gradient_estimator != "pathwise":
        estimator = config.gradient_estimator
        words += f", {_ESTIMATOR_WORDS.get(estimator, estimator)} gradient"
    if config.free_bits:
        words += f", free bits {config.free_bits:g} nats per layer"
    if config.kl_warmup:
        words += f", KL warm-up over {config.kl_warmup} epochs"
    return words


def _layers(config: VAEConfig) -> str:
    """``"2 layers (40, 40), ladder, "`` for a hierarchy, ``"conditional on 10 classes, "``."""
    sizes, words = config.latent_dims, ""
    if config.condition_dim:
        words = f"conditional on {config.condition_dim} classes, "
    if len(sizes) == 1:
        return words
    reads = ", decoder reads all" if config.decoder_input == "all" else ""
    return f"{words}{len(sizes)} layers {tuple(sizes)}, {config.inference}{reads}, "


def _one_line(error: BaseException) -> str:
    """The message with line breaks shown as ``\\n`` (a quoted value may contain them)."""
    return "\\n".join(str(error).splitlines())
