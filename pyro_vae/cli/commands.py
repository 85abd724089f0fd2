"""``pyro-vae evaluate``, ``sample``, ``compare``, ``gaps``, ``latent``, ``export``, ``show``."""

from __future__ import annotations

import argparse
import json
import sys

import pyro
import torch

from ..checkpoint import export_model, load_checkpoint
from ..compare import compare_guides
from ..data import load_dataset
from ..gaps import inference_gaps
from ..latent_space import save_latent_pictures
from ..pictures import read_metrics, save_curves, save_image_grid
from ..run_dir import RunDir
from ..runs import (
    evaluate_run,
    format_evaluation,
    format_runs,
    load_run,
    read_run,
    stored_data_spec,
    summarize_run,
    write_json,
)
from ..train import (
    TrainingDiverged,
    one_hot_labels,
)
from ..validation import check_memory
from .arguments import (
    UsageError,
)
from .common import (
    compare_config,
    data_spec,
    resolve_device,
)


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    spec = None
    if args.data is not None:  # other images, scored with the run's likelihood
        likelihood = load_run(args.run_dir).model.likelihood
        spec = data_spec(args.data, args.binarize, likelihood=likelihood)
    record, written = evaluate_run(
        args.run_dir, args.split, args.num_samples, args.batch_size, args.num_points,
        args.seed, device, spec, progress=not args.quiet, checkpoint=args.checkpoint,
    )  # fmt: skip
    if args.json:
        print(json.dumps(record))
        return 0
    print(format_evaluation(record))
    if written is not None:
        print(f"  wrote {written}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    read_run(args.run_dir)
    vae, _ = load_checkpoint(RunDir(args.run_dir).checkpoint)
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


def cmd_compare(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.data is None:
        raise UsageError(f"--preset {args.preset} needs the data: add --data binarized-mnist PATH")
    spec = data_spec(args.data, args.binarize, likelihood=args.likelihood)
    data = load_dataset(spec)
    config = compare_config(args, data)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if (args.out / "compare.csv").exists() and not args.overwrite:
        raise UsageError(
            f"--out {args.out}: already holds a comparison; pass --overwrite or choose another"
        )
    if args.batch_size > data.num_train:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the training set "
            f"({data.num_train} images)"
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
    vae, _ = load_checkpoint(RunDir(args.run_dir).checkpoint, map_location=device)
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
    written = RunDir(args.run_dir).file(RunDir.GAPS)
    write_json(written, result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(split.format(args.split))
    print(f"  wrote {written}")
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    run = read_run(args.run_dir)
    vae, _ = load_checkpoint(RunDir(args.run_dir).checkpoint)
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
    vae, _ = load_checkpoint(RunDir(args.run_dir).checkpoint)
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
