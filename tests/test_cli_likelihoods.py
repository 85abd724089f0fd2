"""Every command with every likelihood: train, evaluate, sample, compare, gaps, pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from pyro_vae import load_checkpoint
from pyro_vae.cli import main

SMALL = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "16", "--quiet"]


def _train(tmp_path: Path, name: str, *flags: str) -> Path:
    out = tmp_path / name
    assert main(["train", *SMALL, "--out", str(out), *flags]) == 0
    return out


def _evaluate(run: Path, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20", "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_binomial_trains_on_the_raw_seventeen_level_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _train(tmp_path, "binomial", "--likelihood", "binomial")
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["likelihood"] == "binomial"
    assert config["model"]["likelihood_options"] == {"total_count": 16}  # from the data
    assert config["data"]["pixels"] == "count"
    vae, _ = load_checkpoint(run / "checkpoint.pt")
    assert vae.likelihood.total_count == 16
    result = _evaluate(run, capsys)
    # 64 pixels of 17 levels: far below the log probability of binary pixels
    assert result["log_likelihood"] < -64 * np.log(2) and result["gap"] > -1.0
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    for picture in ("samples.png", "reconstructions.png"):
        assert (run / picture).stat().st_size > 0
    pixels = load_digits().data
    assert set(np.unique(pixels)) == set(range(17))  # what "raw" means


def test_continuous_bernoulli_reports_log_densities(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _train(tmp_path, "cb", "--likelihood", "continuous-bernoulli")
    assert json.loads((run / "config.json").read_text())["data"]["pixels"] == "unit-interval"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "10", "--quiet"]) == 0
    assert "log densities, not comparable" in capsys.readouterr().out


def test_gaussian_trains_on_a_real_valued_array(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 1)) @ rng.normal(size=(1, 6)) + 0.1 * rng.normal(size=(200, 6))
    np.save(tmp_path / "real.npy", data.astype(np.float32))  # negative and positive values
    run = _train(
        tmp_path, "gauss", "--data", str(tmp_path / "real.npy"), "--likelihood", "gaussian",
        "--likelihood-option", "scale=decoded", "--batch-size", "20",
    )  # fmt: skip
    vae, _ = load_checkpoint(run / "checkpoint.pt")
    assert vae.likelihood.outputs_per_pixel == 2 and vae.decoder(vae.prior_loc).shape == (12,)
    assert np.isfinite(_evaluate(run, capsys)["log_likelihood"])
    assert main(["gaps", str(run), "--num-points", "3", "--num-steps", "5", "--quiet"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--likelihood", "binomial", "--binarize", "static"],
            "--binarize and --likelihood binomial do not fit",
        ),
        (
            ["--likelihood", "binomial", "--likelihood-option", "total_count=8"],
            "likelihood 'binomial' needs values in",
        ),
        (["--likelihood", "poisson"], "invalid choice: 'poisson'"),
        (
            ["--likelihood", "gaussian", "--likelihood-option", "scale=wide"],
            "scale must be 'learned', 'decoded' or a positive number",
        ),
    ],
)
def test_likelihoods_that_do_not_fit_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    capsys.readouterr()
    assert main(["train", *SMALL, "--out", str(tmp_path / "bad"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_compare_takes_the_likelihood(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--guides", "diagonal", "--seeds", "1", "--epochs", "1"]
    args += ["--num-samples", "5", "--latent-dim", "2", "--hidden-dims", "16", "--quiet"]
    assert main([*args, "--likelihood", "binomial", "--out", str(out)]) == 0
    config = json.loads((out / "runs" / "diagonal-seed0" / "config.json").read_text())
    assert config["model"]["likelihood_options"] == {"total_count": 16}
    assert (out / "samples-diagonal.png").exists()
