"""Smoke test of scripts/benchmark_quality.py on a tiny synthetic 28x28 .npz."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pyro
import pytest
from script_loader import load_script

from pyro_vae import evaluate, load_dataset
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.cli import main as cli_main
from pyro_vae.data import DataSpec


def _load_script():  # noqa: ANN202
    return load_script("benchmark_quality")


def _valid_elbos(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row["valid_elbo"]) for row in csv.DictReader(handle)]


def test_benchmark_quality_reports_the_best_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    images = (rng.random((36, 784)) < 0.2).astype(np.uint8)
    np.savez(data, train=images[:24], valid=images[24:])
    script, run, table = _load_script(), tmp_path / "run", tmp_path / "quality.md"
    argv = ["--data", str(data), "--preset", "mnist-mlp", "--guide", "diagonal"]
    argv += ["--epochs", "2", "--num-samples", "16", "--num-points", "5", "--out", str(run)]
    argv += ["--table", str(table), "--", "--latent-dim", "2", "--hidden-dims", "8"]
    argv += ["--batch-size", "12", "--kl-warmup", "1"]
    assert script.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    row = json.loads(out[0])
    assert set(row) == set(script.COLUMNS)
    assert (row["recipe"], row["guide"], row["epochs"], row["K"], row["images"]) == (
        "mnist-mlp", "diagonal", 2, 16, 5
    )  # fmt: skip
    elbos = _valid_elbos(run)
    assert row["best epoch"] == 1 + elbos.index(max(elbos))
    assert math.isclose(row["gap"], -row["valid NLL"] - row["valid ELBO"], abs_tol=1e-9)
    assert row["gap"] >= -0.5 and all(math.isfinite(row[c]) for c in ("valid NLL", "gap"))
    # the numbers are those of checkpoint.pt on the first 5 validation images, seed 0
    vae, _ = load_checkpoint(run / "checkpoint.pt")
    pyro.set_rng_seed(0)
    x = load_dataset(DataSpec("binarized-mnist", str(data))).split("valid")[:5]
    assert evaluate(vae, x, num_samples=16).log_likelihood == pytest.approx(-row["valid NLL"])
    # the reported command reproduces the training run
    command = shlex.split(row["command"])[1:]
    command[command.index("--out") + 1] = str(tmp_path / "again")
    assert cli_main(command) == 0
    assert _valid_elbos(tmp_path / "again") == elbos
    assert out[1].startswith("| recipe |") and out[3] == script.markdown_row(row)
    assert table.read_text().splitlines() == out[1:4]
    capsys.readouterr()
    assert script.main([*argv[:-2], "--overwrite"]) == 0  # a second row, no second header
    lines = table.read_text().splitlines()
    assert len(lines) == 4 and lines[0] == out[1] and lines[3].startswith("| mnist-mlp |")
