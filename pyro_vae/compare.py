"""Compare guides: same decoder, data, seeds and budget; tables and pictures over seeds."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import atomic_write, load_checkpoint
from .data import Dataset
from .evaluate import active_units, evaluate
from .guides import GUIDES
from .model import VAE, VAEConfig
from .pictures import save_image_grid
from .run_dir import RunDir
from .train import TrainConfig, fit
from .validation import check_positive_int

__all__ = [
    "METRICS",
    "CompareConfig",
    "active_units",
    "compare_guides",
    "summarize",
    "write_report",
]

#: Per-run quantities, in nats per image except ``active_units`` and ``seconds_per_epoch``.
METRICS = (
    "elbo",
    "log_likelihood",
    "gap",
    "kl",
    "reconstruction",
    "active_units",
    "seconds_per_epoch",
)
LABELS = {
    "elbo": "test ELBO",
    "log_likelihood": "IS log p(x)",
    "gap": "gap log p(x) - ELBO",
    "kl": "KL(q || p(z))",
    "reconstruction": "E_q log p(x|z)",
    "active_units": "active units",
    "seconds_per_epoch": "s / epoch",
}


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and with which shared budget.

    Args:
        guides: Keys of ``GUIDES``, in table order.
        num_seeds: Runs per guide, seeds 0 .. num_seeds - 1 unless ``seeds`` names them
            (initialization, minibatch order,
            evaluation draws).
        num_samples: Importance samples K per test image for log p(x).
        latent_dim: Latent size D, shared.
        hidden_dims: Encoder widths, shared; the decoder mirrors them.
        train: Optimization settings shared by every run (its seed is replaced per run).
        split: Split to evaluate on (``test``; ``valid`` when there is no test split).
        guide_options: Extra constructor arguments per guide key.
        model_options: Further :class:`~pyro_vae.model.VAEConfig` fields shared by every
            run, e.g. ``{"likelihood": "binomial", "likelihood_options": {"total_count": 16},
            "arch": "gated", "prior": "vamp"}``.
    """

    guides: tuple[str, ...]
    num_seeds: int = 3
    num_samples: int = 5000
    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = (200,)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(num_epochs=100))
    split: str = "test"
    guide_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            if (
                not seeds
                or len(set(seeds)) != len(seeds)
                or any(
                    isinstance(seed, bool) or not isinstance(seed, int) or seed < 0
                    for seed in seeds
                )
            ):
                raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
            object.__setattr__(self, "seeds", seeds)
            object.__setattr__(self, "num_seeds", len(seeds))
        object.__setattr__(self, "guides", tuple(self.guides))
        if not self.guides:
            raise ValueError("guides must name at least one guide")
        for key in self.guides:
            if key not in GUIDES:
                raise ValueError(f"unknown guide {key!r}; choose from {', '.join(sorted(GUIDES))}")
        if len(set(self.guides)) != len(self.guides):
            raise ValueError(f"guides must be distinct, got {','.join(self.guides)}")
        for name in ("num_seeds", "num_samples"):
            value = getattr(self, name)
            check_positive_int(name, value)
        fixed = {"data_dim", "latent_dim", "hidden_dims", "guide", "guide_options", "image_shape"}
        fixed.add("condition_dim")  # evaluation here is unconditional
        unknown = set(self.model_options) - (set(VAEConfig.__dataclass_fields__) - fixed)
        if unknown:
            raise ValueError(f"model_options cannot set {sorted(unknown)}")


def _latent_sizes(config: CompareConfig) -> str:
    """``16``, or ``4,2 (2 layers, bottom-up)`` for a hierarchy."""
    sizes = config.model_options.get("latent_dims") or (config.latent_dim,)
    if len(sizes) == 1:
        return str(sizes[0])
    inference = config.model_options.get("inference", "bottom-up")
    return f"{','.join(map(str, sizes))} ({len(sizes)} layers, {inference})"


def _run_one(
    data: Dataset,
    config: CompareConfig,
    key: str,
    seed: int,
    run_dir: Path,
    data_spec: dict[str, Any] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train and evaluate one guide with one seed under a private RNG state."""
    device = data.train.device
    vae_config = VAEConfig(
        data.data_dim,
        config.latent_dim,
        config.hidden_dims,
        key,
        config.guide_options.get(key, {}),
        data.image_shape,
        **config.model_options,
    )
    train = replace(config.train, seed=seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"version": __version__, "model": vae_config.to_dict(), "train": vars(train)}
    payload["data"] = data_spec
    RunDir(run_dir).write_record(payload)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left untouched
        torch.manual_seed(seed)
        history = fit(VAE(vae_config).to(device), data, train, run_dir, progress=False)
        vae, _ = load_checkpoint(RunDir(run_dir).checkpoint, map_location=device)
        x = data.split(config.split)
        result = evaluate(vae, x, num_samples=config.num_samples)
        row = {"guide": key, "seed": seed, **result.to_dict()}
        row["active_units"] = active_units(vae, x)
    row["seconds_per_epoch"] = sum(h["seconds"] for h in history) / len(history)
    return row, history


def compare_guides(
    data: Dataset,
    config: CompareConfig,
    out_dir: str | Path,
    data_spec: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every guide with every seed, evaluate, and write the report into ``out_dir``.

    Runs go to ``out_dir/runs/GUIDE-seedS`` (each a run folder that ``pyro-vae evaluate``
    and ``pyro-vae gaps`` accept). Returns the summary rows of :func:`summarize`.
    """
    if config.split == "test" and data.test is None:
        config = replace(config, split="valid")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, histories = [], {key: [] for key in config.guides}
    seeds = config.seeds or tuple(range(config.num_seeds))
    runs = [(key, seed) for key in config.guides for seed in seeds]
    with tqdm(runs, disable=not progress, unit="run", dynamic_ncols=True) as bar:
        for key, seed in bar:
            bar.set_description(f"{key} seed {seed}")
            run_dir = out_dir / "runs" / f"{key}-seed{seed}"
            row, history = _run_one(data, config, key, seed, run_dir, data_spec)
            rows.append(row)
            histories[key].append(history)
            bar.set_postfix(elbo=f"{row['elbo']:.2f}", gap=f"{row['gap']:.2f}")
    summary = summarize(rows, config.guides)
    write_report(out_dir, rows, summary, histories, config)
    for key in config.guides:
        with torch.random.fork_rng(devices=[]):  # rebuilding a VAE draws initial weights
            first = RunDir(out_dir / "runs" / f"{key}-seed{seeds[0]}")
            vae, _ = load_checkpoint(first.checkpoint)
        images = vae.sample_images(64, generator=torch.Generator().manual_seed(0)).cpu()
        span = vae.likelihood.value_range() or (float(images.min()), float(images.max()))
        path = out_dir / f"samples-{key}.png"
        save_image_grid(path, images, vae.config.image_shape, value_range=span)
    return summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(rows: Sequence[dict[str, Any]], guides: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of every metric, one row per guide."""
    summary = []
    for key in guides:
        mine = [row for row in rows if row["guide"] == key]
        out: dict[str, Any] = {"guide": key, "num_seeds": len(mine)}
        for metric in METRICS:
            out[f"{metric}_mean"], out[f"{metric}_std"] = _mean_std([r[metric] for r in mine])
        summary.append(out)
    return summary


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _markdown(summary: Sequence[dict[str, Any]], config: CompareConfig, num_points: int) -> str:
    header = ["guide", *(LABELS[m].replace("|", "\\|") for m in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["guide"]]
        for metric in METRICS:
            digits = 2 if metric != "seconds_per_epoch" else 3
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    train = config.train
    note = (
        f"\nMean ± standard deviation over {config.num_seeds} seeds; nats per image on the "
        f"{config.split} split ({num_points} images), IS with K = {config.num_samples}. "
        f"D = {_latent_sizes(config)}, hidden {','.join(map(str, config.hidden_dims))}, "
        f"{train.num_epochs} epochs, batch {train.batch_size}, lr {train.lr:g}, "
        f"objective {train.objective} (particles {train.num_particles}); best-validation "
        "checkpoint of each run. Active units: Cov_x(E_q[z_d]) > 0.01. s / epoch includes "
        "the per-epoch validation ELBO.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_report(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    histories: dict[str, list[list[dict[str, Any]]]],
    config: CompareConfig,
) -> list[Path]:
    """``runs.csv``, ``compare.csv``, ``compare.md``, ``elbo_curves.png``, ``gaps.png``."""
    paths = [out_dir / name for name in ("runs.csv", "compare.csv", "compare.md")]
    _write_csv(paths[0], rows)
    _write_csv(paths[1], summary)
    text = _markdown(summary, config, rows[0]["num_points"])
    atomic_write(paths[2], lambda tmp: tmp.write_text(text))
    paths.append(_save_curves(out_dir / "elbo_curves.png", histories))
    paths.append(_save_gap_bars(out_dir / "gaps.png", summary))
    return paths


def _save_figure(path: Path, figure: Any) -> Path:  # noqa: ANN401 (matplotlib Figure)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return path


def _save_curves(path: Path, histories: dict[str, list[list[dict[str, Any]]]]) -> Path:
    """Validation (solid) and train (dashed) ELBO per epoch, mean and ±1 std band over seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.add_subplot()
    for index, (key, runs) in enumerate(histories.items()):
        color = f"C{index}"
        for column, style in (("valid_elbo", "-"), ("train_elbo", "--")):
            curves = torch.tensor([[h[column] for h in run] for run in runs], dtype=torch.float64)
            epochs = torch.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            label = f"{key} ({column.split('_')[0]})"
            ax.plot(epochs, mean, style, color=color, label=label)
            if curves.shape[0] > 1 and column == "valid_elbo":
                std = curves.std(0)
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per image)")
    ax.set_title("ELBO per epoch, mean ± std over seeds")
    ax.legend()
    return _save_figure(path, figure)


def _save_gap_bars(path: Path, summary: Sequence[dict[str, Any]]) -> Path:
    """Bar per guide: log p(x) - ELBO, with ±1 std over seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5, 1.2 * len(summary) + 2), 4), layout="constrained")
    ax = figure.add_subplot()
    names = [row["guide"] for row in summary]
    means = [row["gap_mean"] for row in summary]
    stds = [row["gap_std"] for row in summary]
    ax.bar(names, means, yerr=stds, capsize=6, color=[f"C{i}" for i in range(len(names))])
    for i, mean in enumerate(means):
        ax.annotate(
            f"{mean:.2f}",
            (i, mean),
            ha="center",
            va="bottom",
            xytext=(12, 2),
            textcoords="offset points",
        )
    ax.set_ylabel("log p(x) - ELBO (nats per image)")
    ax.set_title("Inference gap per guide\n(mean ± std over seeds)", fontsize="medium")
    return _save_figure(path, figure)
