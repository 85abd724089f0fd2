"""The pyro-vae command line: train, evaluate, sample, compare, gaps, show, latent, export."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pyro
import torch

from . import __version__
from .callbacks import Callback, TensorBoardCallback
from .checkpoint import CheckpointError, export_model, load_checkpoint, read_payload
from .compare import CompareConfig, compare_guides
from .data import BINARIZE_MODES, DATASETS, DataError, Dataset, DataSpec, load_dataset
from .distributed import Replica, finish_worker, init_replica
from .evaluate import evaluate, layer_active_units
from .gaps import inference_gaps
from .guides import GUIDES, FlowGuide
from .hierarchy import DECODER_INPUTS, INFERENCES
from .latent_space import save_latent_pictures
from .likelihoods import LIKELIHOODS
from .model import VAE, VAEConfig
from .networks import ARCHS
from .objectives import GRADIENT_ESTIMATORS, OBJECTIVES
from .pictures import read_metrics, save_curves, save_image_grid
from .presets import PRESETS
from .priors import LATENTS, PRIORS
from .resume import LAST
from .run_folder import PREVIOUS, CommitOnFirstEpoch, RunFolder
from .runs import (
    CONFIG,
    discard_unstarted,
    format_runs,
    prepare_run_dir,
    read_config_file,
    read_run,
    record_evaluation,
    restarted_run,
    run_folder,
    run_record,
    save_run_pictures,
    set_aside_old_run,
    stored_data_spec,
    summarize_run,
    train_options,
    write_json,
)
from .schedules import LR_SCHEDULES
from .train import (
    CHECKPOINT,
    METRICS,
    RunNotWritten,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    fit,
    one_hot_labels,
)
from .validation import MAX_SEED, check_memory

__all__ = ["main"]

#: train flags that ``--resume`` accepts; every other setting comes from the run's config.json.
RESUME_FLAGS = ("resume", "epochs", "lr", "clip_norm", "device", "quiet", "tensorboard")


class UsageError(ValueError):
    """Bad command-line input; reported in one line with exit status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is empty (None, [], False) or its help names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, [], False):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---------------------------------------------------------------- argument types


def _integer_at_least(text: str, minimum: int) -> int:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer_at_least(text, 1)


def _seed(text: str) -> int:
    value = _integer_at_least(text, 0)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, got {text!r}")
    return value


def _count(text: str) -> int:
    return _integer_at_least(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip().lower() in ("0", "0.0"):
        return 0.0
    return _positive_float(text)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 400 or 400,200, got {text!r}"
        ) from None


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.replace("-", "_"), raw


# ---------------------------------------------------------------- parser


def _add_data_args(parser: argparse.ArgumentParser, default: Sequence[str] | None) -> None:
    parser.add_argument(
        "--data",
        nargs="+",
        metavar=("NAME", "PATH"),
        default=default,
        help=f"dataset: {', '.join(DATASETS)} (all but digits take a PATH), or "
        "the path of a .npy/.npz array",
    )
    parser.add_argument(
        "--binarize",
        choices=BINARIZE_MODES,
        default=None,
        help="how to binarize intensities in [0, 1]",
    )


def build_parser(
    train_defaults: dict[str, Any] | None = None, compare_defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """The ``pyro-vae`` parser; ``*_defaults`` replace defaults of train/compare options."""
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders in Pyro.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="train a VAE and write a run folder",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(train.add_argument_group("data"), ["digits"])
    guide = train.add_argument_group("guide")
    guide.add_argument("--guide", choices=sorted(GUIDES), default="full", help="q(z|x)")
    _add_guide_args(guide)
    guide.add_argument(
        "--layer-guides",
        type=_guide_list,
        default=None,
        metavar="G1,...,GL",
        help="guide of each layer, bottom-up (default: --guide for every layer)",
    )
    model = train.add_argument_group("model")
    _add_model_args(model)
    model.add_argument(
        "--conditional",
        action="store_true",
        help="condition encoder and decoder on the data's labels, one-hot (a conditional VAE)",
    )
    _add_optimization_args(train.add_argument_group("optimization"), epochs=300)
    recipe = train.add_argument_group("recipe")
    _add_recipe_args(recipe)
    recipe.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="settings from a JSON or TOML file, e.g. a run's config.json (reproduces that "
        "run); flags given here override them",
    )
    run = train.add_argument_group("run")
    run.add_argument("--seed", type=_seed, default=0, help="initial weights and training draws")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last.pt (settings from its config.json; "
        "--epochs, --lr, --clip-norm may change)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="log ELBOs, KL, lr and sample images to RUN_DIR/tensorboard (needs tensorboard)",
    )

    ev = commands.add_parser("evaluate", help="ELBO and IS log p(x) of a trained run")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--split", choices=("test", "valid", "train"), default="test")
    ev.add_argument("--num-samples", type=_positive_int, default=5000)
    ev.add_argument(
        "--num-points", type=_positive_int, default=None, help="only the first N images"
    )
    ev.add_argument("--batch-size", type=_positive_int, default=100)
    _add_data_args(ev, None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=_seed, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = commands.add_parser("sample", help="decode prior samples into a PNG grid")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("-n", "--num-images", type=_positive_int, default=64)
    sample.add_argument("--out", type=Path, default=None)
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument(
        "--draws",
        action="store_true",
        help="also write images drawn from p(x|z) (binary for bernoulli) beside the means",
    )
    compare = _add_compare_parser(commands)
    _add_gaps_parser(commands)
    _add_show_parser(commands)
    _add_latent_parser(commands)
    _add_export_parser(commands)
    if train_defaults:
        train.set_defaults(**train_defaults)
    if compare_defaults:
        compare.set_defaults(**compare_defaults)
    return parser


def _add_guide_args(group: argparse._ArgumentGroup) -> None:
    """Options of the guide families: ``--guide-option``, ``--num-flows``, flow widths."""
    _add_options_arg(group, "guide", "tril_scale=0.03")
    group.add_argument(
        "--num-flows",
        type=_positive_int,
        default=None,
        metavar="K",
        help=f"maps in a flow guide ({', '.join(_flow_guides())}); 4 when not given",
    )
    group.add_argument(
        "--flow-hidden-dims",
        type=_int_list,
        default=None,
        help="hidden widths of each flow map's network, comma-separated (default: 10 * latent)",
    )


def _add_model_args(group: argparse._ArgumentGroup) -> None:
    """Sizes, layers, networks, likelihood and prior: the model flags train and compare share."""
    group.add_argument("--latent-dim", type=_positive_int, default=16, help="latent size D")
    group.add_argument(
        "--latent-dims",
        type=_int_list,
        default=None,
        metavar="D1,...,DL",
        help="L stochastic layers, sizes from z_1 (next to x) to z_L (under --prior); "
        "replaces --latent-dim",
    )
    group.add_argument(
        "--inference",
        choices=INFERENCES,
        default="bottom-up",
        help="posterior of several layers: bottom-up q(z_1|x) q(z_2|z_1,x)..., top-down "
        "q(z_L|x) q(z_L-1|z_L,x)..., or ladder (bottom-up pass merged with the top-down pass; "
        "diagonal)",
    )
    group.add_argument(
        "--decoder-input",
        choices=DECODER_INPUTS,
        default="z1",
        help="what p(x|.) of several layers reads: z1, or all layers [z_1..z_L]",
    )
    group.add_argument(
        "--hidden-dims",
        type=_int_list,
        default=(200,),
        help="encoder widths, comma-separated; the decoder mirrors them",
    )
    group.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        default="mlp",
        help="encoder/decoder networks: mlp, gated (gated linear layers), conv (28x28 only)",
    )
    _add_options_arg(group, "arch", "channels=[16,32]")
    group.add_argument(
        "--likelihood",
        choices=sorted(LIKELIHOODS),
        default="bernoulli",
        help="p(x|z): bernoulli (binary pixels), continuous-bernoulli (intensities in [0, 1]), "
        "binomial (integers 0..L), gaussian (real values); data are loaded to match",
    )
    _add_options_arg(group, "likelihood", "total_count=255 or scale=decoded")
    group.add_argument("--prior", choices=sorted(PRIORS), default="standard", help="p(z)")
    _add_options_arg(group, "prior", "num_components=50")
    group.add_argument(
        "--latent",
        choices=LATENTS,
        default=None,
        help="sphere: z on the unit sphere, uniform prior, --guide vmf (default: the guide's)",
    )


def _add_optimization_args(group: argparse._ArgumentGroup, epochs: int) -> None:
    """Epochs, batches, Adam, particles, the objective and its estimator, clipping."""
    group.add_argument("--epochs", type=_positive_int, default=epochs, help="passes over train")
    group.add_argument("--batch-size", type=_positive_int, default=100, help="images per step")
    group.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    group.add_argument(
        "--num-particles", type=_positive_int, default=1, help="vectorized z draws per image"
    )
    group.add_argument("--jit", action="store_true", help="compile the loss (JitTrace_ELBO)")
    group.add_argument(
        "--validate",
        action="store_true",
        help="keep Pyro's distribution checks on while training (slower)",
    )
    group.add_argument(
        "--clip-norm",
        type=_positive_float,
        default=None,
        help="clip the gradient's total norm to this value (default: no clipping)",
    )
    _add_objective_args(group)
    group.add_argument(
        "--free-bits",
        type=_non_negative_float,
        default=0.0,
        metavar="NATS",
        help="keep each latent layer's KL term at NATS per image or more (0: off)",
    )
    group.add_argument(
        "--gradient-estimator",
        choices=tuple(dict.fromkeys(e for fits in GRADIENT_ESTIMATORS.values() for e in fits)),
        default="pathwise",
        help="encoder gradient: pathwise, stl (sticking the landing; elbo, meanfield) or dreg "
        "(doubly reparameterized; iwae)",
    )


def _train_config(args: argparse.Namespace, seed: int | None = None) -> TrainConfig:
    """The TrainConfig of the optimization and recipe flags (``seed`` replaces ``--seed``)."""
    return TrainConfig(
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_particles=args.num_particles,
        seed=args.seed if seed is None else seed,
        clip_norm=args.clip_norm,
        objective=_objective(args.objective),
        jit=args.jit,
        validate=args.validate,
        kl_warmup=args.kl_warmup,
        lr_schedule=args.lr_schedule,
        lr_gamma=args.lr_gamma,
        lr_min=args.lr_min,
        patience=args.patience,
        free_bits=args.free_bits,
        gradient_estimator=args.gradient_estimator,
    )


def _add_options_arg(parser: argparse.ArgumentParser, axis: str, example: str) -> None:
    """``--AXIS-option KEY=VALUE`` (repeatable): a constructor argument of that part."""
    parser.add_argument(
        f"--{axis}-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"extra {axis} argument, e.g. {example}",
    )


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="defaults of a named recipe (see README); flags given here override them, "
        "--data is still needed",
    )
    parser.add_argument(
        "--kl-warmup",
        type=_count,
        default=0,
        metavar="EPOCHS",
        help="weight the KL term by beta rising linearly from 0 to 1 over EPOCHS (0: off)",
    )
    parser.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default="constant", help="learning rate per epoch"
    )
    parser.add_argument(
        "--lr-gamma",
        type=_positive_float,
        default=0.99,
        help="per-epoch factor of --lr-schedule exponential, in (0, 1]",
    )
    parser.add_argument(
        "--lr-min",
        type=float,
        default=0.0,
        help="floor of the exponential and cosine schedules",
    )
    parser.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N epochs without a better validation ELBO (None: off)",
    )


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``. For ``train``, ``--preset NAME`` and then ``--config FILE`` give the
    defaults; flags written in ``argv`` override both."""
    args = build_parser().parse_args(argv)
    preset, config = getattr(args, "preset", None), getattr(args, "config", None)
    if preset is None and config is None:
        return args
    defaults: dict[str, Any] = {}
    if preset is not None:
        defaults.update({"data": None, **PRESETS[preset].settings})
    if config is not None:
        defaults.update(_config_defaults(config))
    if args.command == "compare":  # the guides are compared: a preset's guide is not
        defaults.pop("guide", None)
        return build_parser(compare_defaults=defaults).parse_args(argv)
    return build_parser(train_defaults=defaults).parse_args(argv)


def _config_defaults(path: Path) -> dict[str, Any]:
    """``train`` option values from a config file (JSON or TOML, e.g. a run's config.json)."""
    options = train_options(read_config_file(path), where=str(path))
    dests = vars(build_parser().parse_args(["train"]))
    unknown = sorted(set(options) - set(dests) - {"config", "preset", "resume"})
    if unknown:
        raise UsageError(f"{path}: unknown settings {unknown}")
    for key, value in options.items():
        if key.endswith("_option"):
            options[key] = [tuple(pair) for pair in value]
        elif isinstance(value, list) and key != "data":
            options[key] = tuple(value)
    return options


class _Unset(list):
    """Default that marks an option argv did not set; a list, so "append" options work."""


def _given_train_options(argv: Sequence[str]) -> set[str]:
    """Destinations of the ``train`` options written in ``argv`` (not filled from defaults)."""
    unset = _Unset()
    dests = vars(build_parser().parse_args(["train"]))
    probe = build_parser({dest: unset for dest in dests}).parse_args(argv)
    return {dest for dest, value in vars(probe).items() if value is not unset}


def _add_objective_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="elbo",
        help="elbo (Trace_ELBO), meanfield (analytic KL where known) or iwae "
        "(K-sample bound, K = --num-particles)",
    )
    parser.add_argument(
        "--elbo",
        dest="objective",
        choices=("trace", "meanfield"),
        help="alias: --elbo meanfield = --objective meanfield, --elbo trace = --objective elbo",
    )


def _seeds(text: str) -> int | tuple[int, ...]:
    """``3`` (seeds 0, 1, 2) or ``0,4,7`` (those seeds; ``7,`` the one seed 7)."""
    if "," not in text:
        return _positive_int(text)
    try:
        return tuple(_seed(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seeds or comma-separated seeds >= 0, got {text!r}"
        ) from None


def _guide_list(text: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [key for key in keys if key not in GUIDES]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown guide(s) {','.join(unknown) or text!r}; "
            f"choose from {','.join(sorted(GUIDES))}"
        )
    return keys


def _add_compare_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    cmp = commands.add_parser(
        "compare",
        help="train several guides over seeds and compare them",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(cmp.add_argument_group("data"), ["digits"])
    guides = cmp.add_argument_group("guides")
    guides.add_argument(
        "--guides", type=_guide_list, default=("diagonal", "full"), help="comma-separated"
    )
    _add_guide_args(guides)
    _add_model_args(cmp.add_argument_group("model"))
    _add_optimization_args(cmp.add_argument_group("optimization"), epochs=100)
    _add_recipe_args(cmp.add_argument_group("recipe"))
    run = cmp.add_argument_group("comparison")
    run.add_argument(
        "--seeds",
        type=_seeds,
        default=3,
        metavar="N | S1,S2,...",
        help="number of seeds (0..N-1), or the seeds as a comma list (one seed: '7,')",
    )
    run.add_argument(
        "--num-samples", type=_positive_int, default=5000, help="importance samples K"
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--out", type=Path, required=True, help="report folder")
    run.add_argument("--overwrite", action="store_true", help="replace an existing report")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmp


def _add_latent_parser(commands: argparse._SubParsersAction) -> None:
    latent = commands.add_parser(
        "latent",
        help="pictures of a run's latent space: codes in 2-D, interpolations, traversals",
        formatter_class=_HelpFormatter,
    )
    latent.add_argument("run_dir", type=Path)
    latent.add_argument("--split", choices=("test", "valid", "train"), default="test")
    latent.add_argument(
        "--num-points", type=_positive_int, default=1000, help="images whose codes are drawn"
    )
    latent.add_argument("--out", type=Path, default=None, help="folder (default: the run's)")
    latent.add_argument("--seed", type=_seed, default=0, help="draws of flow guides' codes")


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write a run's best model as model.safetensors and config.json"
    )
    export.add_argument("run_dir", type=Path)
    export.add_argument("out_dir", type=Path, help="folder for the two files")


def _add_show_parser(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser("show", help="summarize run folders in one table")
    show.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    show.add_argument("--curves", type=Path, default=None, metavar="OUT.png",
                      help="also draw the runs' ELBO curves into one picture")  # fmt: skip
    show.add_argument("--json", action="store_true", help="print one JSON object per run")


def _add_gaps_parser(commands: argparse._SubParsersAction) -> None:
    gaps = commands.add_parser("gaps", help="split the inference gap of a trained run")
    gaps.add_argument("run_dir", type=Path)
    gaps.add_argument("--num-points", type=_positive_int, default=100)
    gaps.add_argument("--split", choices=("test", "valid", "train"), default="test")
    gaps.add_argument("--num-steps", type=_positive_int, default=500, help="local SVI steps")
    gaps.add_argument("--lr", type=_positive_float, default=1e-2, help="local SVI Adam lr")
    gaps.add_argument("--num-particles", type=_positive_int, default=10)
    gaps.add_argument("--num-samples", type=_positive_int, default=1000)
    gaps.add_argument("--batch-size", type=_positive_int, default=100)
    gaps.add_argument("--device", default="auto")
    gaps.add_argument("--seed", type=_seed, default=0)
    gaps.add_argument("--json", action="store_true", help="print one JSON object")
    gaps.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- helpers


def _flow_guides() -> list[str]:
    return sorted(key for key, cls in GUIDES.items() if issubclass(cls, FlowGuide))


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
            f"{run_dir / CONFIG}; only --epochs, --lr, --clip-norm, --device, --quiet apply"
        )
    run = read_run(run_dir)
    if not (run_dir / LAST).is_file():
        raise UsageError(
            f"--resume {run_dir}: no {LAST} (no epoch finished); start again with --overwrite"
        )
    try:
        spec, config = DataSpec(**run["data"]), VAEConfig.from_dict(run["model"])
        stored = dict(run["train"])
        for key in ("epochs", "lr", "clip_norm"):
            if key in given:
                stored["num_epochs" if key == "epochs" else key] = getattr(args, key)
        train_config = TrainConfig(**stored)
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{run_dir / CONFIG}: not a usable run configuration ({error})") from None
    done = read_payload(run_dir / LAST).get("epoch")
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


def _recipe_words(args: argparse.Namespace, config: TrainConfig) -> str:
    """``", preset mnist-vamp, KL warm-up over 30 epochs"`` (empty when neither is set)."""
    words = ""
    if getattr(args, "preset", None):
        words += f", preset {args.preset}"
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


# ---------------------------------------------------------------- commands


def _continue_after_restart(args: argparse.Namespace) -> bool:
    """A worker restarted by ``torchrun --max-restarts`` continues its job's run: resumes it
    when an epoch was completed, else replaces its unstarted attempt. Whether it resumes."""
    if args.resume is not None or args.data is None:
        return False
    spec = data_spec(args.data, args.binarize, likelihood=args.likelihood)
    run_dir = args.out or Path("runs") / f"{spec.name}-{args.guide}"
    action = restarted_run(run_dir)
    if action == "replace":
        args.overwrite = True
    elif action == "resume":
        args.resume, args.overwrite = run_dir, False
        if int(os.environ.get("RANK", "0")) == 0:
            epoch = read_payload(run_dir / LAST).get("epoch")
            print(
                f"pyro-vae: restarted: continuing {run_dir} from {LAST} (epoch {epoch})",
                file=sys.stderr,
            )
    return action == "resume"


def cmd_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    restarted = _continue_after_restart(args)
    resuming = args.resume is not None
    if resuming:
        main_process = int(os.environ.get("RANK", "0")) == 0
        if main_process and (args.resume / PREVIOUS).is_dir():  # a killed overwrite: settle it
            with run_folder(args.resume):
                pass
        spec, config, train_config = _resume_settings(args, check_flags=not restarted)
    else:
        if args.data is None:
            raise UsageError(
                f"--preset {args.preset} needs the data: add --data binarized-mnist PATH"
            )
        spec, config = data_spec(args.data, args.binarize, likelihood=args.likelihood), None
        train_config = _train_config(args)
    data = load_dataset(spec)
    if train_config.batch_size > data.train.shape[0]:
        raise UsageError(
            f"--batch-size {train_config.batch_size} is larger than the training set "
            f"({data.train.shape[0]} images)"
        )
    if config is None:
        likelihood = LIKELIHOODS[args.likelihood]
        config = VAEConfig(
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
    config.check_data(data.split("valid"), data.pixels, "the validation images")
    if args.tensorboard:
        _require_tensorboard()
    replica, device = init_replica(device)  # under torchrun: join the process group
    if replica.world_size > 1 and args.jit:
        raise UsageError("--jit is not supported with several processes")
    pyro.set_rng_seed(train_config.seed)  # the same initial weights on every rank
    vae = VAE(config).to(device)  # guide options are checked here, before the folder exists
    pyro.set_rng_seed(train_config.seed + replica.rank)  # then each rank draws its own noise
    if resuming:
        run_dir, created = args.resume, False
    else:
        run_dir, created = prepare_run_dir(
            args.out, spec, args.guide, args.overwrite, replica.is_main
        )
    folder = run_folder(run_dir)
    if not replica.is_main:
        return _train_in_folder(args, vae, data, train_config, folder, replica, [])[0] or 0
    record = run_record(config, train_config, spec, getattr(args, "argv", None))
    try:
        with folder:  # one writer: refused while another live process trains here
            if resuming:
                for stale in run_dir.glob(".*.tmp"):  # left by a writer killed before its rename
                    stale.unlink()
            else:
                set_aside_old_run(folder, args.overwrite)
                write_json(run_dir / CONFIG, record)
            more = replica.world_size - 1
            print(
                f"{'resuming' if resuming else 'training'} a VAE ({_layers(config)}"
                f"{config.guide} guide, {config.prior} prior, {config.arch} networks, "
                f"{config.likelihood} likelihood) on "
                f"{spec.name}: "
                f"{data.train.shape[0]} train / {data.valid.shape[0]} valid images of "
                f"{data.data_dim} pixels, on {device}"
                + _recipe_words(args, train_config)
                + (f" and {more} more processes" if more else ""),
                file=sys.stderr,
            )

            def commit() -> None:  # the new settings are recorded once an epoch ran with them
                folder.commit()
                if resuming:
                    write_json(run_dir / CONFIG, record)

            callbacks: list[Callback] = [CommitOnFirstEpoch(commit)]
            if args.tensorboard:
                callbacks.append(TensorBoardCallback(run_dir / "tensorboard", data.split("valid")))
            status, history = _train_in_folder(
                args, vae, data, train_config, folder, replica, callbacks
            )
            if status is not None:
                return status
            return _report_run(run_dir, data, device, train_config, history)
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _report_run(
    run_dir: Path,
    data: Dataset,
    device: torch.device,
    train_config: TrainConfig,
    history: list[dict[str, Any]],
) -> int:
    """Pictures and curves of a finished run, and what it wrote, on stdout."""
    vae, payload = load_checkpoint(run_dir / CHECKPOINT, map_location=device)
    condition = one_hot_labels(vae, data, "valid")
    condition = None if condition is None else condition.to(device)
    pictures = save_run_pictures(vae, data.split("valid").to(device), run_dir, condition)
    pictures.append(save_curves({run_dir.name: read_metrics(run_dir)}, run_dir / "curves.png"))
    early = len(history) < train_config.num_epochs  # only early stopping ends a run sooner
    note = f" (stopped early: patience {train_config.patience})" if early else ""
    if train_config.kl_warmup and len(history) <= train_config.kl_warmup:
        note += (
            f"; the run ended inside its {train_config.kl_warmup}-epoch KL warm-up, so the "
            "model has not yet been trained on the full ELBO"
        )
    print(
        f"best valid ELBO {payload['valid_elbo']:.3f} nats at epoch {payload['epoch']} of "
        f"{len(history)}{note}"
    )
    for path in (run_dir / CONFIG, run_dir / CHECKPOINT, run_dir / LAST, run_dir / METRICS):
        print(f"  wrote {path}")
    for path in pictures:
        print(f"  wrote {path}")
    print(f"next: pyro-vae evaluate {run_dir}")
    return 0


def _train_in_folder(
    args: argparse.Namespace,
    vae: VAE,
    data: Dataset,
    train_config: TrainConfig,
    folder: RunFolder,
    replica: Replica,
    callbacks: list[Callback],
) -> tuple[int | None, list[dict[str, Any]]]:
    """Run ``fit`` in the folder: (None, its history) when it finished, else (the exit status
    of its stop, [])

    A run that stops before completing an epoch leaves no files, and an old run set aside by
    ``--overwrite`` comes back.
    """
    run_dir = folder.path
    try:
        with _sigterm_as_interrupt():
            history = fit(
                vae,
                data,
                train_config,
                run_dir,
                not args.quiet,
                args.resume is not None,
                replica,
                callbacks,
            )
    except (TrainingDiverged, TrainingInterrupted, RunNotWritten) as error:
        return (_report_stop(error, folder) if replica.is_main else 1), []
    except BaseException:
        if replica.is_main:
            _undo_unstarted(folder)
        raise
    return None, history


def _undo_unstarted(folder: RunFolder) -> bool:
    """Drop a run that completed no epoch (and bring back the run it replaced); whether an
    old run came back."""
    discard_unstarted(folder.path)
    return folder.restore()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM (what schedulers and ``kill`` send) stops training like Ctrl-C does.

    Background processes may ignore SIGINT; SIGTERM then gives the same clean stop: the epoch
    in progress is dropped, ``last.pt`` keeps the one before, and ``--resume`` continues.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _report_stop(
    error: TrainingDiverged | TrainingInterrupted | RunNotWritten, folder: RunFolder
) -> int:
    """One line on stderr for a diverged or unwritable (status 1) or interrupted (130) run."""
    run_dir = folder.path
    started = (run_dir / LAST).exists()
    restored = False if started else _undo_unstarted(folder)
    if isinstance(error, TrainingInterrupted):
        hint = f"; continue with: pyro-vae train --resume {run_dir}" if started else ""
        print(f"pyro-vae: {_one_line(error)}{hint}", file=sys.stderr)
        return 130
    if isinstance(error, RunNotWritten):
        hint = f"; then: pyro-vae train --resume {run_dir}" if started else ""
    elif started:
        hint = f"; then: pyro-vae train --resume {run_dir} --lr LOWER"
    elif restored:
        hint = f"; no epoch had finished, so {run_dir} keeps the run it held before"
    else:
        hint = f"; no epoch had finished, so {run_dir} keeps no run"
    print(f"pyro-vae: error: {_one_line(error)}{hint}", file=sys.stderr)
    return 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run = read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT, map_location=device)
    if args.data is not None:
        spec = data_spec(args.data, args.binarize, likelihood=vae.config.likelihood)
    else:
        spec = stored_data_spec(args.run_dir, run)
    data = load_dataset(spec)
    x = data.split(args.split)[: args.num_points]
    if x.shape[1] != vae.config.data_dim:
        raise UsageError(
            f"the data has {x.shape[1]} pixels per image but the checkpoint "
            f"expects {vae.config.data_dim}"
        )
    condition = one_hot_labels(vae, data, args.split)
    condition = None if condition is None else condition[: args.num_points].to(device)
    pyro.set_rng_seed(args.seed)
    result = evaluate(
        vae,
        x.to(device),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        condition=condition,
        progress=not args.quiet,
    )
    extra = {"split": args.split}
    if len(vae.latent_sites) > 1:
        extra["layer_active_units"] = layer_active_units(vae, x.to(device))
    record = {**result.to_dict(), **extra}
    written = record_evaluation(args.run_dir, record) if args.data is None else None
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"{args.split} split, {result.num_points} images, K = {result.num_samples} "
        "importance samples (nats per image)"
    )
    if not vae.likelihood.discrete:
        print(
            f"  likelihood {vae.config.likelihood!r} is a density: these are log densities, "
            "not comparable with log probabilities of discrete data"
        )
    layers = [(f"  KL of layer {name}", value) for name, value in result.layer_kl.items()]
    for label, value in (
        ("ELBO", result.elbo),
        ("reconstruction E_q log p(x|z)", result.reconstruction),
        ("KL(q(z|x) || p(z))", result.kl),
        *layers,
        ("IS log p(x)", result.log_likelihood),
        ("gap log p(x) - ELBO", result.gap),
    ):
        print(f"  {label:<32}{value:10.3f}")
    for name, count in extra.get("layer_active_units", {}).items():
        print(f"  {'active units of layer ' + name:<32}{count:6d}")
    if written is not None:
        print(f"  wrote {written}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT)
    out = args.out or args.run_dir / f"samples-{args.num_images}.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the picture is written as PNG; use a .png name")
    per_image = vae.likelihood.outputs_per_pixel * vae.config.data_dim + vae.config.latent_dim
    check_memory(f"-n {args.num_images} images", 8 * args.num_images * per_image)
    condition = vae.class_cycle(args.num_images)
    span = vae.likelihood.value_range()
    columns = vae.config.condition_dim or None  # a conditional VAE: one column per class
    pictures = [(out, False)]
    if args.draws:
        pictures.append((out.with_name(f"{out.stem}-draws{out.suffix}"), True))
    for path, draws in pictures:  # the same seed: the draws come from the means' z
        generator = torch.Generator().manual_seed(args.seed)
        images = vae.sample_images(args.num_images, generator, condition, draw_pixels=draws)
        what = "drawn from p(x|z)" if draws else f"{vae.likelihood.key} means"
        title = f"{args.num_images} images from the prior ({what})"
        save_image_grid(
            path, images, vae.config.image_shape, columns, value_range=span, title=title
        )
        print(f"wrote {path}")
    return 0


def _objective(name: str) -> str:
    return "elbo" if name == "trace" else name


def cmd_compare(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.data is None:
        raise UsageError(f"--preset {args.preset} needs the data: add --data binarized-mnist PATH")
    spec = data_spec(args.data, args.binarize, likelihood=args.likelihood)
    data = load_dataset(spec)
    likelihood_options = LIKELIHOODS[args.likelihood].options_for_data(
        dict(args.likelihood_option), data.train, data.levels
    )
    config = CompareConfig(
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
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if (args.out / "compare.csv").exists() and not args.overwrite:
        raise UsageError(
            f"--out {args.out}: already holds a comparison; pass --overwrite or choose another"
        )
    if args.batch_size > data.train.shape[0]:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the training set "
            f"({data.train.shape[0]} images)"
        )
    print(
        f"comparing {', '.join(config.guides)} on {spec.name} with {config.num_seeds} seeds, "
        f"{args.epochs} epochs each, on {device}",
        file=sys.stderr,
    )
    try:
        compare_guides(data.to(device), config, args.out, vars(spec), progress=not args.quiet)
    except TrainingDiverged as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return 1
    print((args.out / "compare.md").read_text(), end="")
    for name in ("compare.csv", "compare.md", "runs.csv", "elbo_curves.png", "gaps.png"):
        print(f"  wrote {args.out / name}")
    for key in config.guides:
        print(f"  wrote {args.out / f'samples-{key}.png'}")
    return 0


def cmd_gaps(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run = read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT, map_location=device)
    if vae.config.condition_dim:
        raise UsageError(f"{args.run_dir}: gaps takes an unconditional VAE (condition_dim 0)")
    x = load_dataset(stored_data_spec(args.run_dir, run)).split(args.split)[: args.num_points]
    pyro.set_rng_seed(args.seed)
    split, _ = inference_gaps(
        vae,
        x.to(device),
        num_steps=args.num_steps,
        lr=args.lr,
        num_particles=args.num_particles,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    result = {**split.to_dict(), "split": args.split}
    write_json(args.run_dir / "gaps.json", result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.split} split, {split.num_points} images, {split.num_steps} local SVI steps, "
        f"K = {split.num_samples} (nats per image)"
    )
    for label, value in (
        ("IS log p(x)", split.log_likelihood),
        ("ELBO[q*] (local, non-amortized)", split.elbo_local),
        ("ELBO[q_phi] (amortized)", split.elbo_amortized),
        ("approximation gap log p - ELBO[q*]", split.approximation_gap),
        ("amortization gap ELBO[q*] - ELBO[q]", split.amortization_gap),
        ("inference gap log p - ELBO[q]", split.inference_gap),
    ):
        print(f"  {label:<38}{value:10.3f}")
    print(f"  wrote {args.run_dir / 'gaps.json'}")
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    run = read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT)
    data = load_dataset(stored_data_spec(args.run_dir, run))
    x = data.split(args.split)[: args.num_points]
    labels = data.labels(args.split)
    labels = None if labels is None else labels[: args.num_points]
    condition = one_hot_labels(vae, data, args.split)
    condition = None if condition is None else condition[: args.num_points]
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(args.seed)
    for path in save_latent_pictures(vae, x, out, labels, condition):
        print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    read_run(args.run_dir)
    vae, _ = load_checkpoint(args.run_dir / CHECKPOINT)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise UsageError(f"{args.out_dir}: exists and is not a folder")
    for path in export_model(vae, args.out_dir):
        print(f"wrote {path}")
    print(f"load it with pyro_vae.VAE.from_pretrained({str(args.out_dir)!r})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    rows = [summarize_run(run_dir) for run_dir in args.run_dirs]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_runs(rows))
    if args.curves is not None:
        if args.curves.suffix.lower() != ".png":
            raise UsageError(f"--curves {args.curves}: the picture is PNG; use a .png name")
        curves = {str(run): read_metrics(run) for run in args.run_dirs}
        print(f"wrote {save_curves(curves, args.curves)}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
    "compare": cmd_compare,
    "gaps": cmd_gaps,
    "show": cmd_show,
    "latent": cmd_latent,
    "export": cmd_export,
}


def _one_line(error: BaseException) -> str:
    """The message with line breaks shown as ``\\n`` (a quoted value may contain them)."""
    return "\\n".join(str(error).splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input).

    A ``torchrun`` worker leaves its process group and exits here instead of returning.
    """
    return finish_worker(_run(argv))


def _run(argv: Sequence[str] | None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _parse(argv)
        args.argv = argv
        return COMMANDS[args.command](args)
    except (UsageError, DataError, CheckpointError, ValueError, OSError) as error:
        # ValueError: invalid settings caught by the library's constructors
        print(f"pyro-vae: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
