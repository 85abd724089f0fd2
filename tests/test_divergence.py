"""Divergence: injected NaN/inf stops training at the right epoch and step; --clip-norm."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from robust_helpers import cli_train, save_binary_npy, tiny_data, tiny_vae

from pyro_vae.checkpoint import read_payload
from pyro_vae.cli import main
from pyro_vae.distributed import ELBOLoss
from pyro_vae.resume import LAST
from pyro_vae.train import (
    METRICS,
    TrainConfig,
    TrainingDiverged,
    _step,
    fit,
    make_loss,
)

STEPS_PER_EPOCH = 3  # 48 images, batches of 16


def poison(vae: torch.nn.Module, where: str, bad_step: int, value: float) -> None:
    """Make the loss (``where="loss"``) or one gradient (``"gradient"``) ``value`` at step n."""
    calls = [0]
    if where == "loss":

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            calls[0] += module.training  # validation passes do not count
            return out * value if module.training and calls[0] == bad_step else out

        vae.decoder.register_forward_hook(hook)
    else:
        weight = next(vae.decoder.parameters())

        def grad_hook(grad: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return grad * value if calls[0] == bad_step else grad

        weight.register_hook(grad_hook)


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own warning, then ours
@pytest.mark.parametrize("log_every", [1, 2, 10])
@pytest.mark.parametrize(
    ("where", "value", "validate", "clip", "expected"),
    [
        ("loss", math.nan, False, None, "step 2: loss nan"),
        ("loss", math.nan, True, None, "step 2: NaN/inf in a distribution parameter (logits)"),
        ("gradient", math.inf, False, 1e9, "step 2: loss "),  # clipping reads the norm
        ("gradient", math.inf, True, None, "step 2: a NaN/inf gradient made the parameters"),
        ("gradient", math.inf, False, None, None),  # seen in the parameters or the next loss
    ],
)
def test_injected_nan_stops_at_epoch_and_step(
    tmp_path: Path,
    where: str,
    value: float,
    validate: bool,
    clip: float | None,
    expected: str | None,
    log_every: int,
) -> None:
    vae = tiny_vae()
    poison(vae, where, bad_step=STEPS_PER_EPOCH + 2, value=value)  # epoch 2, step 2
    # a forward hook acts on the eager loss only (a compiled graph replays its first call);
    # gradient hooks run in autograd and reach the compiled loss too
    jit = False if where == "loss" or validate else None
    config = TrainConfig(
        num_epochs=4,
        batch_size=16,
        seed=3,
        log_every=log_every,
        validate=validate,
        clip_norm=clip,
        jit=jit,
    )
    with pytest.raises(TrainingDiverged) as info:
        fit(vae, tiny_data(), config, tmp_path, progress=False)
    message = str(info.value)
    if expected is None:  # checked right after step 2, or seen in the loss of step 3
        expected = (
            "step 2: a NaN/inf gradient made the parameters NaN/inf"
            if log_every <= 2
            else "step 3: loss nan (from this step or a NaN/inf gradient of the step before)"
        )
    if clip is not None:
        assert "gradient norm inf" in message
    assert "epoch 2, " + expected in message and "--lr" in message and "--clip-norm" in message
    assert "\n" not in message
    last = read_payload(tmp_path / LAST)
    assert last["epoch"] == 1
    assert all(v.isfinite().all() for v in last["state_dict"].values())
    assert read_payload(tmp_path / "checkpoint.pt")["epoch"] == 1
    with open(tmp_path / METRICS, newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]


def test_step_clips_the_gradient_norm() -> None:
    """With SGD(lr=1) the update is minus the gradient scaled to norm ``clip_norm``."""
    torch.manual_seed(0)
    data = tiny_data(dynamic=False)
    x = data.split("train")[:16]
    loss_fn = make_loss(TrainConfig(jit=False)).differentiable_loss
    reference = tiny_vae()
    torch.manual_seed(1)
    loss_fn(reference.model, reference.guide, x, num_data=48).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    clip = float(norm) / 7
    vae = tiny_vae()
    before = [p.detach().clone() for p in vae.parameters()]
    torch.manual_seed(1)
    step_loss = ELBOLoss(vae, make_loss(TrainConfig()))
    sgd = torch.optim.SGD(vae.parameters(), lr=1.0)
    _, reported = _step(step_loss, sgd, x, 48, None, clip)
    torch.testing.assert_close(reported, norm)
    for b, p, g in zip(before, vae.parameters(), grads, strict=True):
        torch.testing.assert_close(b - p.detach(), g * clip / norm, rtol=1e-4, atol=1e-6)


def test_clip_norm_is_validated_and_stored(tmp_path: Path) -> None:
    for bad in (0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="clip_norm"):
            TrainConfig(clip_norm=bad)
    data = save_binary_npy(tmp_path / "d.npy")
    assert main(cli_train(data, tmp_path / "run", 1, "--clip-norm", "5")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["clip_norm"] == 5
    assert read_payload(tmp_path / "run" / LAST)["train_config"]["clip_norm"] == 5


def test_cli_divergence_is_one_line_with_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import pyro_vae.train as train_module

    original, calls = train_module._step, [0]

    def step(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        loss, norm = original(*args, **kwargs)
        return (loss * math.nan if calls[0] == 6 else loss), norm  # epoch 2, step 2

    monkeypatch.setattr(train_module, "_step", step)
    data = save_binary_npy(tmp_path / "d.npy")  # 32 train images, 4 steps per epoch
    run = tmp_path / "run"
    assert main(cli_train(data, run, 3)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "epoch 2, step 2" in err[-1] and f"--resume {run}" in err[-1]
    assert read_payload(run / LAST)["epoch"] == 1


def test_cli_divergence_from_a_huge_learning_rate_prints_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Pyro's own NaN warnings (errors under this test config) are not shown: one line."""
    data = save_binary_npy(tmp_path / "d.npy")
    assert main(cli_train(data, tmp_path / "run", 2, "--lr", "1e308")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("training a VAE (diagonal guide, standard prior")
    assert "training diverged at epoch 1" in err[1] and "loss nan" in err[1]
