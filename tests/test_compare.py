"""compare: every file written, summaries consistent with the runs, private RNG, active units."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.compare import METRICS, CompareConfig, active_units, compare_guides
from pyro_vae.data import Dataset
from pyro_vae.guides import GUIDES
from pyro_vae.model import VAE, VAEConfig
from pyro_vae.train import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


def _dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 8, generator=g)  # two prototypes
    draw = lambda n: torch.bernoulli(probs[torch.arange(n) % 2], generator=g)  # noqa: E731
    return Dataset(draw(40), draw(10), draw(12), image_shape=(2, 4))


def _config(**kwargs: object) -> CompareConfig:
    values = dict(
        guides=tuple(sorted(GUIDES)),
        num_seeds=2,
        num_samples=20,
        latent_dim=2,
        hidden_dims=(8,),
        train=TrainConfig(num_epochs=2, batch_size=20),
    )
    return CompareConfig(**{**values, **kwargs})


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_compare_writes_every_file_and_consistent_summaries(tmp_path: Path) -> None:
    config = _config()
    state = torch.get_rng_state()
    summary = compare_guides(_dataset(), config, tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # runs seed a private RNG state
    for name in ("compare.csv", "compare.md", "runs.csv", "elbo_curves.png", "gaps.png"):
        assert (tmp_path / name).is_file(), name
    for key in config.guides:
        assert (tmp_path / f"samples-{key}.png").read_bytes().startswith(PNG)
        for seed in range(2):
            run = tmp_path / "runs" / f"{key}-seed{seed}"
            assert {"checkpoint.pt", "config.json", "metrics.csv"} <= {
                p.name for p in run.iterdir()
            }
    for name in ("elbo_curves.png", "gaps.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    runs = _read(tmp_path / "runs.csv")
    assert len(runs) == 2 * len(config.guides)
    for row in runs:
        values = {k: float(row[k]) for k in ("elbo", "reconstruction", "kl", "log_likelihood")}
        assert math.isclose(values["elbo"], values["reconstruction"] - values["kl"], abs_tol=1e-4)
        assert math.isclose(
            float(row["gap"]), values["log_likelihood"] - values["elbo"], abs_tol=1e-4
        )
        assert 0 <= int(row["active_units"]) <= 2 and float(row["seconds_per_epoch"]) > 0
    table = _read(tmp_path / "compare.csv")
    markdown = (tmp_path / "compare.md").read_text()
    for row, returned in zip(table, summary, strict=True):
        mine = [r for r in runs if r["guide"] == row["guide"]]
        for metric in METRICS:
            values = np.array([float(r[metric]) for r in mine])
            assert math.isclose(
                float(row[f"{metric}_mean"]), values.mean(), rel_tol=1e-9, abs_tol=1e-12
            )
            assert math.isclose(
                float(row[f"{metric}_std"]), values.std(ddof=1), rel_tol=1e-9, abs_tol=1e-12
            )
            assert math.isclose(
                returned[f"{metric}_mean"], values.mean(), rel_tol=1e-9, abs_tol=1e-12
            )
        assert f"| {row['guide']} | {float(row['elbo_mean']):.2f} ± " in markdown


def test_compare_runs_are_reproducible_per_seed(tmp_path: Path) -> None:
    config = _config(guides=("diagonal",), num_seeds=1)
    compare_guides(_dataset(), config, tmp_path / "a", progress=False)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    compare_guides(_dataset(), config, tmp_path / "b", progress=False)
    a, b = _read(tmp_path / "a" / "runs.csv"), _read(tmp_path / "b" / "runs.csv")
    for key in ("elbo", "log_likelihood", "kl"):
        assert a[0][key] == b[0][key]


def test_compare_config_rejects_bad_guides() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        _config(guides=("diagonal", "nope"))
    with pytest.raises(ValueError, match="distinct"):
        _config(guides=("diagonal", "diagonal"))


@pytest.mark.parametrize("closed_form_mean", [True, False])
def test_active_units_counts_dimensions_whose_posterior_mean_varies(
    closed_form_mean: bool,
) -> None:
    vae = VAE(VAEConfig(8, 3, (8,), "diagonal"))
    encoder = vae.encoder
    with torch.no_grad():
        encoder.loc.weight[1:].zero_()  # dims 1 and 2: mean constant over x
        encoder.loc.weight[0].fill_(2.0)
        encoder.raw_scale.weight.zero_()
        encoder.raw_scale.bias.fill_(-4.0)  # scale ~ 0.018
    if not closed_form_mean:  # no .mean: the estimate must sample
        base_forward = encoder.forward
        encoder.forward = lambda x: dist.TransformedDistribution(base_forward(x), [])
        with pytest.raises(NotImplementedError):
            _ = encoder(torch.zeros(1, 8)).mean
    x = torch.bernoulli(torch.full((200, 8), 0.5))
    assert active_units(vae, x) == 1
    assert active_units(vae, x, threshold=1e6) == 0


def _write_npz(path: Path) -> Path:
    data = _dataset()
    np.savez(path, train=data.train.numpy(), valid=data.valid.numpy(), test=data.test.numpy())
    return path


def test_cli_compare_smoke_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    npz = _write_npz(tmp_path / "tiny.npz")
    argv = ["compare", "--data", str(npz), "--guides", "diagonal", "--seeds", "1",
            "--epochs", "1", "--num-samples", "5", "--latent-dim", "2", "--hidden-dims", "8",
            "--batch-size", "20", "--out", str(tmp_path / "cmp"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "| diagonal |" in capsys.readouterr().out
    config = json.loads((tmp_path / "cmp" / "runs" / "diagonal-seed0" / "config.json").read_text())
    assert config["data"]["path"] == str(npz.resolve())
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv[:4], "diagonal,flowz", *argv[5:]]) == 2
    assert "'flowz'" in capsys.readouterr().err


def test_compare_takes_the_model_and_recipe_flags_of_train(tmp_path: Path) -> None:
    from pyro_vae.cli import _parse

    args = _parse(["compare", "--preset", "mnist-gated", "--epochs", "3", "--out", "r"])
    assert (args.arch, args.latent_dim, args.hidden_dims) == ("gated", 40, (300, 300))
    assert (args.kl_warmup, args.lr_schedule, args.epochs) == (30, "exponential", 3)
    assert args.guides == ("diagonal", "full")  # a preset's guide is not the comparison's
    out = tmp_path / "cmp"
    argv = ["compare", "--guides", "diagonal,iaf", "--num-flows", "2", "--seeds", "1"]
    argv += ["--epochs", "2", "--kl-warmup", "1", "--lr-schedule", "cosine", "--num-samples"]
    argv += ["5", "--latent-dim", "2", "--hidden-dims", "8", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    records = {
        key: json.loads((out / "runs" / f"{key}-seed0" / "config.json").read_text())
        for key in ("diagonal", "iaf")
    }
    assert records["iaf"]["model"]["guide_options"] == {"num_flows": 2}
    assert records["diagonal"]["model"]["guide_options"] == {}  # flow flags: flow guides only
    for record in records.values():
        assert (record["train"]["kl_warmup"], record["train"]["lr_schedule"]) == (1, "cosine")


def test_train_help_groups_the_flags_and_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for group in ("data:", "guide:", "model:", "optimization:", "recipe:", "run:"):
        assert f"\n{group}\n" in text, group
    assert "(default: 300)" in text and "(default: full)" in text
    assert "(default: None)" not in text and "(default: [])" not in text


def test_compare_takes_the_seeds_as_a_list(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--guides", "diagonal", "--seeds", "2,5", "--epochs", "1"]
    argv += ["--num-samples", "5", "--latent-dim", "2", "--hidden-dims", "8", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert runs == ["diagonal-seed2", "diagonal-seed5"]
    with (out / "runs.csv").open() as handle:
        assert sorted(int(row["seed"]) for row in csv.DictReader(handle)) == [2, 5]
    with pytest.raises(ValueError, match="seeds must be distinct"):
        CompareConfig(guides=("diagonal",), seeds=(1, 1))
    assert main(["compare", "--seeds", "1,x", "--out", str(tmp_path / "bad")]) == 2
