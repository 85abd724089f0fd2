"""The parser of the pyro-vae command line: argument types, groups and defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..data import BINARIZE_MODES, DATASETS
from ..guides import GUIDES
from ..hierarchy import DECODER_INPUTS, INFERENCES
from ..likelihoods import LIKELIHOODS
from ..networks import ARCHS
from ..objectives import GRADIENT_ESTIMATORS, OBJECTIVES
from ..presets import PRESETS
from ..priors import LATENTS, PRIORS
from ..run_dir import CHECKPOINT_FILES
from ..runs import (
    read_config_file,
    train_options,
)
from ..schedules import LR_SCHEDULES
from ..train import (
    TrainConfig,
)
from .arg_types import (
    UsageError,
    _count,
    _flow_guides,
    _guide_list,
    _HelpFormatter,
    _int_list,
    _key_value,
    _non_negative_float,
    _objective,
    _Parser,
    _positive_float,
    _positive_int,
    _seed,
    _seeds,
)

#: train flags that ``--resume`` accepts; every other setting comes from the run's config.json.
RESUME_FLAGS = ("resume", "epochs", "lr", "clip_norm", "device", "quiet", "tensorboard")


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
    run.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="start a new run from the weights of RUN_DIR's best checkpoint.pt (or of a "
        "checkpoint file), e.g. to fine-tune with another objective; the model settings must "
        "be the same (take them with --config RUN_DIR/config.json)",
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
    ev.add_argument(
        "--checkpoint",
        choices=tuple(CHECKPOINT_FILES),
        default="best",
        help="the model of checkpoint.pt (best validation epoch) or last.pt (latest epoch)",
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
    group.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the loss with JitTrace_ELBO; default: wherever it applies (objective "
        "elbo, pathwise or stl estimator, no free bits, no --validate, traceable parts); "
        "--no-jit: Pyro's eager ELBOs",
    )
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
        help="stop after N epochs without a better validation ELBO (IWAE bound for "
        "--objective iwae) (None: off)",
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
