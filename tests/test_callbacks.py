"""fit's callbacks and the TensorBoard logger: what is called when, and what is written."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from robust_helpers import tiny_data, tiny_vae

from pyro_vae import Callback, TensorBoardCallback, TrainConfig, fit
from pyro_vae.cli import main


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_fit_start(self, vae: Any, steps_per_epoch: int) -> None:  # noqa: ANN401
        self.calls.append(("start", steps_per_epoch))

    def on_step(self, epoch: int, step: int, running_elbo: float) -> None:
        self.calls.append(("step", (epoch, step, running_elbo)))

    def on_epoch_end(self, epoch: int, row: dict[str, Any], vae: Any) -> None:  # noqa: ANN401
        self.calls.append(("epoch", (epoch, dict(row))))

    def on_fit_end(self, history: Any) -> None:  # noqa: ANN401
        self.calls.append(("end", list(history)))


def test_fit_calls_every_hook_in_order() -> None:
    recorder = Recorder()
    config = TrainConfig(num_epochs=3, batch_size=8, log_every=2)  # 48 images: 6 steps
    history = fit(tiny_vae(), tiny_data(), config, progress=False, callbacks=[recorder])
    kinds = [kind for kind, _ in recorder.calls]
    assert kinds == ["start"] + (["step"] * 3 + ["epoch"]) * 3 + ["end"]
    assert recorder.calls[0][1] == 6
    steps = [value for kind, value in recorder.calls if kind == "step"]
    assert [(e, s) for e, s, _ in steps] == [(e, s) for e in (1, 2, 3) for s in (2, 4, 6)]
    assert all(torch.isfinite(torch.tensor(v)) for _, _, v in steps)
    rows = [value[1] for kind, value in recorder.calls if kind == "epoch"]
    assert rows == history and recorder.calls[-1][1] == history
    # the last running value of an epoch is that epoch's train ELBO
    assert [s[2] for s in steps[2::3]] == pytest.approx([r["train_elbo"] for r in history])


def test_tensorboard_event_files_hold_the_metrics_and_samples(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tiny_data(dynamic=False)
    logger = TensorBoardCallback(tmp_path / "tb", data.split("valid"), num_images=4)
    config = TrainConfig(num_epochs=2, batch_size=16, kl_warmup=1)
    history = fit(tiny_vae(), data, config, tmp_path / "run", progress=False, callbacks=[logger])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    for tag, key in (("elbo/train", "train_elbo"), ("elbo/valid", "valid_elbo")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(row["epoch"], row[key]) for row in history]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [e.value for e in events.Scalars("kl_weight")] == [0.0, 1.0]
    assert all(e.value >= 0 for e in events.Scalars("kl/valid"))
    images = events.Images("samples")
    assert [image.step for image in images] == [1, 2]
    assert images[0].width * images[0].height == 4 * 12  # four 12-pixel images, tiled


def test_the_cli_logs_to_tensorboard_or_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "16", "--quiet"]
    run = tmp_path / "run"
    assert main(["train", *small, "--tensorboard", "--out", str(run)]) == 0
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    with (run / "metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 1
    assert main(["train", "--resume", str(run), "--epochs", "2", "--tensorboard", "--quiet"]) == 0
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    capsys.readouterr()
    assert main(["train", *small, "--tensorboard", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard needs the tensorboard package" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists()
    with pytest.raises(ImportError, match="pip install 'pyro-vae\\[tensorboard\\]'"):
        TensorBoardCallback(tmp_path / "tb")
