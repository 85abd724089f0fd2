"""Presets: the same settings as their flags, overridable, documented, and trainable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pyro_vae.cli import _parse, build_parser, main
from pyro_vae.presets import PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"
DATA = ["--data", "binarized-mnist", "mnist.npz"]


def _settings(argv: list[str]) -> dict:
    values = vars(_parse(argv))
    values.pop("preset")
    return values


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_equals_its_flags(name: str) -> None:
    dests = vars(build_parser().parse_args(["train"]))
    assert set(PRESETS[name].settings) <= set(dests) - {"preset", "data", "command"}
    with_preset = _settings(["train", "--preset", name, *DATA])
    with_flags = _settings(["train", *PRESETS[name].flags(), *DATA])
    assert with_preset == with_flags
    defaults = _settings(["train", *DATA])
    changed = {key for key in defaults if defaults[key] != with_preset[key]}
    assert changed == {key for key, v in PRESETS[name].settings.items() if v != defaults[key]}


def test_flags_given_override_the_preset() -> None:
    argv = ["train", "--preset", "mnist-vamp", *DATA, "--latent-dim", "7", "--epochs", "3"]
    args = _parse([*argv, "--prior-option", "num_components=20", "--kl-warmup", "0"])
    assert (args.latent_dim, args.epochs, args.kl_warmup) == (7, 3, 0)
    assert args.hidden_dims == (300, 300) and args.prior == "vamp" and args.clip_norm == 2e7
    assert dict(args.prior_option) == {"num_components": 20}  # the later value wins
    assert _parse(["train", *DATA]).hidden_dims == (200,)  # no preset: the usual defaults


def test_readme_tabulates_every_preset() -> None:
    text = README.read_text()
    for name, preset in PRESETS.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, name
        assert f"`{' '.join(preset.flags())}`" in rows[0], name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_one_epoch_on_28x28_images(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist.npz"
    images = (rng.random((30, 784)) < 0.2).astype(np.uint8)
    np.savez(data, train=images[:20], valid=images[20:])
    run = tmp_path / "run"
    small = ["--epochs", "1", "--batch-size", "10", "--latent-dim", "4", "--quiet"]
    argv = ["train", "--preset", name, "--data", "binarized-mnist", str(data), *small]
    assert main([*argv, "--out", str(run)]) == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    settings = PRESETS[name].settings
    for key in ("kl_warmup", "lr_schedule", "objective", "num_particles"):
        if key in settings:
            assert config["train"][key] == settings[key], key
    for key in ("arch", "guide", "prior"):
        if key in settings:
            assert config["model"][key] == settings[key], key
    assert config["model"]["hidden_dims"] == list(settings["hidden_dims"])
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and ("kl_weight" in rows[0]) == ("kl_warmup" in settings)
