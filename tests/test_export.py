"""Sharing a model: pyro-vae export writes safetensors and a config; from_pretrained reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyro_vae import VAE, evaluate, load_checkpoint, load_dataset, load_run
from pyro_vae.checkpoint import CheckpointError
from pyro_vae.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    flags = ["--epochs", "2", "--hidden-dims", "16", "--latent-dims", "3,2", "--guide"]
    flags += ["diagonal", "--layer-guides", "diagonal,iaf", "--prior", "vamp", "--quiet"]
    assert main(["train", *flags, "--prior-option", "num_components=5", "--out", str(out)]) == 0
    return out


def test_an_exported_model_evaluates_to_the_same_numbers(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    assert main(["export", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model"]["latent_dims"] == [3, 2]
    exported, (original, _) = VAE.from_pretrained(out), load_checkpoint(run / "checkpoint.pt")
    state, expected = exported.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    x = load_dataset(load_run(run).data).split("test")[:20]
    results = []
    for vae in (exported, original, VAE.from_pretrained(run)):  # a run folder loads too
        torch.manual_seed(0)
        results.append(evaluate(vae, x, num_samples=50))
    assert results[0] == results[1] == results[2]


def test_what_is_not_a_model_is_refused_in_one_line(run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither an exported model"):
        VAE.from_pretrained(tmp_path)
    out = tmp_path / "shared"
    assert main(["export", str(run), str(out)]) == 0
    (out / "model.safetensors").write_bytes(b"not tensors")
    with pytest.raises(CheckpointError, match="not a loadable exported model"):
        VAE.from_pretrained(out)
    (out / "config.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a loadable exported model"):
        VAE.from_pretrained(out)
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
