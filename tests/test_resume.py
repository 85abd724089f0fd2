"""Resume: bit-identical continuation, Ctrl-C, kill -9 mid-epoch, determinism."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from robust_helpers import (
    cli_train,
    save_binary_npy,
    tiny_config,
    tiny_data,
    tiny_vae,
    train_tiny,
    without_seconds,
)

import pyro_vae.train as train_module
from pyro_vae.checkpoint import read_payload
from pyro_vae.cli import main
from pyro_vae.resume import LAST, get_rng_state, set_rng_state
from pyro_vae.train import METRICS, TrainingInterrupted, fit

REPO = Path(__file__).resolve().parents[1]


def scramble_global_rngs() -> None:
    """What a fresh process would start from: nothing of the first run's streams."""
    torch.manual_seed(12345)
    random.seed(678)
    np.random.seed(910)
    pyro.clear_param_store()


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def metrics_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rng_state_round_trip() -> None:
    generator = torch.Generator().manual_seed(5)
    state = get_rng_state(generator)
    expected = (torch.rand(3), torch.randperm(9, generator=generator), random.random())
    expected += (np.random.rand(),)
    scramble_global_rngs()
    generator.manual_seed(77)
    set_rng_state(state, generator)
    again = (torch.rand(3), torch.randperm(9, generator=generator), random.random())
    again += (np.random.rand(),)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    assert again[2:] == expected[2:]


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    full, full_history = train_tiny(tmp_path / "full", 4)
    train_tiny(tmp_path / "part", 2)
    scramble_global_rngs()
    resumed = tiny_vae(seed=99)  # another initialization: last.pt must overwrite it
    history = fit(resumed, tiny_data(), tiny_config(4), tmp_path / "part", False, resume=True)
    assert_same_parameters(full, resumed)
    assert without_seconds(history) == without_seconds(full_history)
    assert [r["valid_elbo"] for r in metrics_rows(tmp_path / "part" / METRICS)] == [
        r["valid_elbo"] for r in metrics_rows(tmp_path / "full" / METRICS)
    ]
    best_full = read_payload(tmp_path / "full" / "checkpoint.pt")
    best_part = read_payload(tmp_path / "part" / "checkpoint.pt")
    assert best_full["epoch"] == best_part["epoch"]
    for key, value in best_full["state_dict"].items():
        assert torch.equal(value, best_part["state_dict"][key])


def test_resume_rejects_other_batch_size(tmp_path: Path) -> None:
    train_tiny(tmp_path, 1)
    config = tiny_config(2, clip_norm=None)
    config = type(config)(**{**vars(config), "batch_size": 8})
    with pytest.raises(ValueError, match="batch_size 8 .*run: 16"):
        fit(tiny_vae(), tiny_data(), config, tmp_path, progress=False, resume=True)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Raise KeyboardInterrupt in the ``call``-th optimization step (1-based)."""
    original, calls = train_module._step, [0]

    def step(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", step)


def test_ctrl_c_keeps_last_epoch_and_resumes_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, _ = train_tiny(None, 4)
    interrupt_at(monkeypatch, 3 * 2 + 2)  # 3 steps per epoch: epoch 3, step 2
    with pytest.raises(TrainingInterrupted, match="during epoch 3.*holds epoch 2") as info:
        train_tiny(tmp_path, 4)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.saved_epoch == 2
    assert read_payload(tmp_path / LAST)["epoch"] == 2
    assert len(metrics_rows(tmp_path / METRICS)) == 2
    monkeypatch.undo()
    scramble_global_rngs()
    resumed = tiny_vae(seed=1)
    fit(resumed, tiny_data(), tiny_config(4), tmp_path, progress=False, resume=True)
    assert_same_parameters(full, resumed)


@pytest.mark.parametrize("saved_before_interrupt", [True, False])
def test_interrupt_while_saving_names_the_epoch_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_before_interrupt: bool
) -> None:
    """Ctrl-C during an epoch's writes: the message names what ``last.pt`` holds, not a guess."""
    original, calls = train_module.save_training_state, [0]

    def save(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] == 2 and not saved_before_interrupt:
            raise KeyboardInterrupt
        original(*args, **kwargs)
        if calls[0] == 2:
            raise KeyboardInterrupt  # after the rename, as during the folder fsync

    monkeypatch.setattr(train_module, "save_training_state", save)
    saved = 2 if saved_before_interrupt else 1
    with pytest.raises(TrainingInterrupted, match=f"during epoch 2.*holds epoch {saved}$") as info:
        train_tiny(tmp_path, 4)
    assert info.value.saved_epoch == read_payload(tmp_path / LAST)["epoch"] == saved


def test_cli_ctrl_c_exits_130_with_resume_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = save_binary_npy(tmp_path / "d.npy")  # 32 train images: 4 steps per epoch
    interrupt_at(monkeypatch, 4 + 1)
    assert main(cli_train(data, tmp_path / "run", 3)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "epoch 1" in err[-1] and f"--resume {tmp_path / 'run'}" in err[-1]
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run" / METRICS)] == ["1", "2", "3"]


def test_cli_ctrl_c_in_first_epoch_leaves_no_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = save_binary_npy(tmp_path / "d.npy")
    interrupt_at(monkeypatch, 2)
    assert main(cli_train(data, tmp_path / "run", 3)) == 130
    assert "no epoch was saved" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    data = save_binary_npy(tmp_path / "d.npy")
    for name in ("a", "b"):
        assert main(cli_train(data, tmp_path / name, 2)) == 0
    a, b = (metrics_rows(tmp_path / name / METRICS) for name in ("a", "b"))
    assert without_seconds(a) == without_seconds(b) and len(a) == 2
    assert main(cli_train(data, tmp_path / "c", 2, "--seed", "5")) == 0
    assert without_seconds(metrics_rows(tmp_path / "c" / METRICS)) != without_seconds(a)


def start_cli_training(data: Path, run: Path, stderr: int) -> subprocess.Popen:
    """``python -m pyro_vae train`` for 1000 epochs in a child process, one thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pyro_vae", *cli_train(data, run, 1000)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def wait_while(process: subprocess.Popen, busy: Callable[[], bool], seconds: float = 60) -> None:
    """Poll until ``busy()`` is false; fail if the process ends or time runs out first."""
    deadline = time.monotonic() + seconds
    while busy():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_mid_epoch_loses_at_most_that_epoch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = save_binary_npy(tmp_path / "d.npy", num_images=400)  # 320 train: 40 steps/epoch
    run = tmp_path / "run"
    process = start_cli_training(data, run, stderr=subprocess.DEVNULL)
    try:
        rows = run / METRICS
        wait_while(process, lambda: not rows.exists() or len(metrics_rows(rows)) < 2)
        time.sleep(random.Random().uniform(0.0, 0.3))  # a random instant of a later epoch
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = read_payload(run / LAST)["epoch"]
    rows = len(metrics_rows(run / METRICS))
    # metrics.csv is written just before last.pt: at most the epoch in progress is lost
    assert saved >= 1 and rows in (saved, saved + 1)
    final = saved + 1
    assert main(["train", "--resume", str(run), "--epochs", str(final)]) == 0
    assert main(cli_train(data, tmp_path / "ref", final)) == 0
    resumed, reference = read_payload(run / LAST), read_payload(tmp_path / "ref" / LAST)
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert without_seconds(resumed["history"]) == without_seconds(reference["history"])


def test_cli_resume_may_change_lr_and_epochs(tmp_path: Path) -> None:
    data = save_binary_npy(tmp_path / "d.npy")
    run = tmp_path / "run"
    assert main(cli_train(data, run, 1)) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", "0.0005"]) == 0
    config = json.loads((run / "config.json").read_text())["train"]
    assert config["num_epochs"] == 2 and config["lr"] == 0.0005 and config["batch_size"] == 8
    state = read_payload(run / LAST)
    assert state["epoch"] == 2 and state["optimizer"]["param_groups"][0]["lr"] == 0.0005
    assert [row["epoch"] for row in metrics_rows(run / METRICS)] == ["1", "2"]


@pytest.mark.parametrize(
    "recipes",
    [
        {"kl_warmup": 3, "lr_schedule": "exponential", "lr_gamma": 0.6, "lr_min": 2e-4},
        {"kl_warmup": 2, "lr_schedule": "cosine", "lr_min": 1e-4},
    ],
)
def test_resume_with_warmup_and_lr_schedule_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipes: dict
) -> None:
    full, full_history = train_tiny(None, 4, **recipes)
    assert len({row["lr"] for row in full_history}) == 4  # the schedule moves every epoch
    interrupt_at(monkeypatch, 3 * 2 + 2)  # epoch 3, step 2: last.pt holds epoch 2
    with pytest.raises(TrainingInterrupted):
        train_tiny(tmp_path, 4, **recipes)
    monkeypatch.undo()
    scramble_global_rngs()
    resumed = tiny_vae(seed=1)
    history = fit(resumed, tiny_data(), tiny_config(4, **recipes), tmp_path, False, resume=True)
    assert_same_parameters(full, resumed)
    assert without_seconds(history) == without_seconds(full_history)
    state = read_payload(tmp_path / LAST)
    assert state["optimizer"]["param_groups"][0]["lr"] == full_history[-1]["lr"]


def test_cli_resumes_a_run_recorded_before_the_recipe_fields(tmp_path: Path) -> None:
    data = save_binary_npy(tmp_path / "d.npy")
    run = tmp_path / "run"
    assert main(cli_train(data, run, 1)) == 0
    config = json.loads((run / "config.json").read_text())
    for key in ("kl_warmup", "lr_schedule", "lr_gamma", "lr_min", "patience"):
        del config["train"][key]  # as written by an older version
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["kl_warmup"], train["lr_schedule"], train["patience"]) == (0, "constant", None)
    assert [row["epoch"] for row in metrics_rows(run / METRICS)] == ["1", "2"]
    assert set(metrics_rows(run / METRICS)[0]) == {"epoch", "train_elbo", "valid_elbo", "seconds"}


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path: Path) -> None:
    data = save_binary_npy(tmp_path / "d.npy", num_images=400)
    run = tmp_path / "run"
    process = start_cli_training(data, run, stderr=subprocess.PIPE)
    try:
        wait_while(process, lambda: not (run / LAST).exists())
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    saved = read_payload(run / LAST)["epoch"]
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err  # the banner and one stop line
    assert f"interrupted during epoch {saved + 1}" in lines[1]
    assert f"continue with: pyro-vae train --resume {run}" in lines[1]
    assert main(["train", "--resume", str(run), "--epochs", str(saved + 1)]) == 0
    assert read_payload(run / LAST)["epoch"] == saved + 1
