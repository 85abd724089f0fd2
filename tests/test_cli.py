"""Command line end to end on tiny data, and one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import evaluate, load_dataset
from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.cli import main
from pyro_vae.data import DataSpec
from pyro_vae.run_dir import RunDir, best_index


@pytest.fixture
def tiny_npy(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npy"
    np.save(path, rng.integers(0, 2, (60, 16)).astype(np.uint8))
    return path


def _train(tiny_npy: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--data",
            str(tiny_npy),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--latent-dim",
            "2",
            "--hidden-dims",
            "8",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_train_evaluate_sample_end_to_end(
    tiny_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert _train(tiny_npy, run) == 0
    out = capsys.readouterr().out
    for name in (
        "config.json",
        "checkpoint.pt",
        "metrics.csv",
        "samples.png",
        "reconstructions.png",
    ):
        assert (run / name).stat().st_size > 0, name
        assert str(run / name) in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["guide"] == "full" and config["model"]["image_shape"] == [4, 4]

    assert main(["evaluate", str(run), "--num-samples", "20", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {
        "elbo",
        "reconstruction",
        "kl",
        "log_likelihood",
        "num_samples",
        "split",
        "num_points",
    }
    assert result["num_points"] == 6 and result["split"] == "test"
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"])
    assert result["log_likelihood"] >= result["elbo"]

    evaluate_4 = ["evaluate", str(run), "--num-points", "4", "--num-samples", "20", "--json"]
    assert main([*evaluate_4, "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out)
    vae, _ = load_checkpoint(run / "checkpoint.pt")
    images = load_dataset(DataSpec(**config["data"])).split("test")
    pyro.set_rng_seed(0)  # the command's default seed
    expected = evaluate(vae, images[:4], num_samples=20)
    assert first["num_points"] == 4 and images.shape[0] == 6
    assert first["log_likelihood"] == pytest.approx(expected.log_likelihood, rel=1e-6)

    metrics = RunDir(run).read_metrics()  # best and last model, each named with its epoch
    assert first["checkpoint"] == "best"
    assert first["epoch"] == metrics["epoch"][best_index(metrics)]
    with torch.no_grad():  # a best model unlike the last one, so the two cannot be confused
        for parameter in vae.parameters():
            parameter.add_(0.5)
    save_checkpoint(run / "checkpoint.pt", vae, epoch=1, valid_elbo=-1.0)
    assert main([*evaluate_4, "--quiet"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert main([*evaluate_4, "--checkpoint", "last", "--quiet"]) == 0
    latest = json.loads(capsys.readouterr().out)
    vae, _ = load_checkpoint(run / "last.pt")
    pyro.set_rng_seed(0)
    expected = evaluate(vae, images[:4], num_samples=20)
    assert latest["checkpoint"] == "last" and latest["epoch"] == metrics["epoch"][-1] == 2
    assert latest["log_likelihood"] == pytest.approx(expected.log_likelihood, rel=1e-6)
    assert best["epoch"] == 1 and abs(latest["log_likelihood"] - best["log_likelihood"]) > 1e-3
    stored = json.loads((run / "eval.json").read_text())
    assert stored["test"] == best and stored["test-last"] == latest
    assert main(["evaluate", str(run), "--checkpoint", "last", "--num-samples", "5"]) == 0
    assert "model of last.pt (epoch 2)" in capsys.readouterr().out

    assert main(["sample", str(run), "-n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_runs_the_same_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", "--guide", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "nope" in done.stderr
    assert "Traceback" not in done.stderr


def _bad_inputs(tmp_path: Path, tiny_npy: Path) -> list[tuple[list[str], str]]:
    nan = tmp_path / "nan.npy"
    np.save(nan, np.where(np.eye(16)[:10] > 0, np.nan, 0.0))
    gray = tmp_path / "gray.npy"
    np.save(gray, np.full((10, 16), 0.5))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 16)))
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((30, 25), dtype=np.uint8))
    run = tmp_path / "good"
    assert _train(tiny_npy, run) == 0
    data = ["--data", str(tiny_npy), "--batch-size", "16"]
    return [
        (["train", "--guide", "nope"], "nope"),
        (["train", "--data", "cifar"], "cifar"),
        (["train", "--data", str(tmp_path / "missing.npy")], "missing.npy"),
        (["train", "--data", str(nan)], "NaN"),
        (["train", "--data", str(gray)], "{0, 1}"),
        (["train", "--data", str(empty)], "empty"),
        (["train", *data, "--latent-dim", "0"], "positive integer"),
        (["train", *data, "--epochs", "-3"], "-3"),
        (["train", *data, "--lr", "0"], "positive"),
        (["train", *data, "--hidden-dims", "8,x"], "8,x"),
        (["train", "--data", str(tiny_npy), "--batch-size", "1000"], "larger than the training"),
        (["train", *data, "--latent-dim", "100000"], "latent_dim"),
        (["train", *data, "--device", "tpu"], "tpu"),
        (["train", *data, "--out", str(run)], "--overwrite"),
        (["evaluate", str(tmp_path / "nowhere")], "not a run folder"),
        (["evaluate", str(run), "--data", str(other)], "pixels"),
        (["evaluate", str(run), "--num-samples", "0"], "positive integer"),
        (["sample", str(run), "--out", str(tmp_path / "s.jpg")], "PNG"),
        (["train", "--preset", "mnist-mlp"], "--data binarized-mnist PATH"),
        (["train", *data, "--preset", "nope"], "nope"),
        (["train", *data, "--kl-warmup", "-1"], "-1"),
        (["train", *data, "--kl-warmup", "2", "--objective", "iwae"], "kl_warmup needs"),
        (["train", *data, "--lr-schedule", "step"], "step"),
        (["train", *data, "--lr-gamma", "1.5"], "lr_gamma"),
        (["train", *data, "--lr-min", "-0.1"], "lr_min"),
        (["train", *data, "--patience", "0"], "positive integer"),
        (["train", "--resume", str(run), "--preset", "mnist-mlp"], "--preset cannot change"),
    ] + ([] if torch.cuda.is_available() else [(["train", *data, "--device", "cuda"], "GPU")])


def test_bad_input_gives_one_line_and_exit_status_2(
    tiny_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = _bad_inputs(tmp_path, tiny_npy)
    capsys.readouterr()
    for argv, needle in cases:
        status = main(argv)
        err = capsys.readouterr().err.strip()
        assert status == 2, (argv, err)
        assert err.startswith("pyro-vae: error:") and "\n" not in err, (argv, err)
        assert needle in err, (argv, err)
    assert not (tmp_path / "missing").exists()


def test_failed_validation_creates_no_run_folder(tiny_npy: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert _train(tiny_npy, out, "--guide-option", "tril_scale=-1") == 2
    assert not out.exists()


def test_recipe_flags_reach_the_config_and_metrics(
    tiny_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    recipes = ["--kl-warmup", "1", "--lr-schedule", "cosine", "--lr-min", "1e-4"]
    assert _train(tiny_npy, run, *recipes, "--patience", "5") == 0
    train = json.loads((run / "config.json").read_text())["train"]
    assert train["kl_warmup"] == 1 and train["lr_schedule"] == "cosine"
    assert train["lr_min"] == 1e-4 and train["patience"] == 5
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["kl_weight"]) for row in rows] == [0.0, 1.0]
    # cosine over 2 epochs from 1e-3 to 1e-4: epoch 2 is halfway
    assert [float(row["lr"]) for row in rows] == pytest.approx([1e-3, 5.5e-4])
    assert "stopped early" not in capsys.readouterr().out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def test_init_starts_a_new_run_from_another_runs_weights(
    tiny_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--init copies the best checkpoint's weights (an lr of 1e-12 then leaves them as they
    were), config.json records where from, and --config of the new run starts there again."""
    first, tuned, again = tmp_path / "first", tmp_path / "tuned", tmp_path / "again"
    assert _train(tiny_npy, first) == 0
    source = _state(first / "checkpoint.pt")
    tune = ["--objective", "iwae", "--num-particles", "3", "--lr", "1e-12", "--seed", "5"]
    assert _train(tiny_npy, tuned, "--init", str(first), *tune) == 0
    assert f"from the weights of {first / 'checkpoint.pt'} (epoch" in capsys.readouterr().err
    for name, value in _state(tuned / "last.pt").items():
        assert torch.allclose(value, source[name], atol=1e-9), name
    record = json.loads((tuned / "config.json").read_text())
    assert record["init"] == str((first / "checkpoint.pt").resolve())
    payload = load_checkpoint(first / "checkpoint.pt")[1]
    assert record["init_checkpoint"] == {k: payload[k] for k in ("epoch", "valid_elbo")}
    assert record["train"]["objective"] == "iwae"
    assert main(["train", "--config", str(tuned / "config.json"), "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text())["init"] == record["init"]
    for name, value in _state(again / "last.pt").items():
        assert torch.allclose(value, source[name], atol=1e-9), name
    fresh = tmp_path / "fresh"  # without --init the same seed starts elsewhere
    assert _train(tiny_npy, fresh, *tune) == 0
    assert not all(
        torch.allclose(value, source[name], atol=1e-3)
        for name, value in _state(fresh / "last.pt").items()
    )


def test_init_refuses_another_model_and_a_resumed_run(
    tiny_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = tmp_path / "first"
    assert _train(tiny_npy, first) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    assert _train(tiny_npy, other, "--init", str(first), "--latent-dim", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "its model differs (latent_dim 2 there, 3 here)" in err
    assert _train(tiny_npy, other, "--init", str(first), "--latent-dims", "3,2") == 2
    err = capsys.readouterr().err.strip()  # the layers, not their first size again
    assert "(latent_dims (2,) there, (3, 2) here" in err and "latent_dim " not in err
    assert "--config RUN_DIR/config.json" in err and not other.exists()
    assert main(["train", "--resume", str(first), "--init", str(first), "--quiet"]) == 2
    assert "--init cannot change" in capsys.readouterr().err
    assert _train(tiny_npy, other, "--init", str(tmp_path / "none.pt")) == 2
    assert "none.pt: no such checkpoint file" in capsys.readouterr().err
