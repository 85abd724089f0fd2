"""Checkpoints: round trip, refusal of code-carrying pickles, format versions."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from pyro_vae import VAE, VAEConfig, load_checkpoint, save_checkpoint
from pyro_vae.checkpoint import FORMAT_VERSION, CheckpointError


def test_round_trip_rebuilds_an_identical_model(tmp_path: Path) -> None:
    config = VAEConfig(6, 3, (8, 5), "full", {"tril_scale": 0.2}, (2, 3))
    vae = VAE(config, name="mine")
    save_checkpoint(tmp_path / "c.pt", vae, epoch=7)
    loaded, payload = load_checkpoint(tmp_path / "c.pt")
    assert loaded.config == config and loaded.prefix == "mine" and payload["epoch"] == 7
    for (name, a), (_, b) in zip(
        vae.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    z = torch.randn(4, 3)
    assert torch.equal(vae.encoder(x).log_prob(z), loaded.encoder(x).log_prob(z))
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"


class _Payload:
    """Unpickling this object would create a file: a stand-in for arbitrary code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.target),))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": _Payload(str(target))}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    assert not target.exists()
    with open(tmp_path / "direct.pt", "wb") as handle:  # a plain pickle, not torch's zip format
        pickle.dump(_Payload(str(target)), handle)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "direct.pt")
    assert not target.exists()


def test_other_format_versions_missing_and_garbage_files_are_clear_errors(tmp_path: Path) -> None:
    vae = VAE(VAEConfig(4, 2, (3,)))
    save_checkpoint(tmp_path / "c.pt", vae)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a (readable )?checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({**payload, "state_dict": {}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_checkpoint(tmp_path / "empty.pt")


def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path: Path) -> None:
    import os

    save_checkpoint(tmp_path / "c.pt", VAE(VAEConfig(4, 2, (3,))))
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == (
        tmp_path / "plain"
    ).stat().st_mode & 0o777
    assert os.access(tmp_path / "c.pt", os.R_OK)
