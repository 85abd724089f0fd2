"""Checkpoint safety: crafted pickles run nothing, format versions, atomic writes under faults."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from robust_helpers import tiny_vae, train_tiny

import pyro_vae.pictures as pictures
from pyro_vae.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from pyro_vae.pictures import save_image_grid
from pyro_vae.resume import LAST
from pyro_vae.train import write_metrics

REPO = Path(__file__).resolve().parents[1]


class CreatesFile:
    """Unpickling this object calls ``open(target, "w")``, i.e. creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple:
        return (open, (self.target, "w"))


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_crafted_pickle_runs_nothing(tmp_path: Path, container: str) -> None:
    target = tmp_path / "pwned"
    payload = {"format_version": FORMAT_VERSION, "config": CreatesFile(target)}
    path = tmp_path / "evil.pt"
    if container == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused to load") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not target.exists()
    # the payload is real: an unsafe load does create the file
    if container == "torch":
        unsafe = torch.load(path, weights_only=False)
    else:
        unsafe = pickle.loads(path.read_bytes())
    unsafe["config"].close()
    assert target.exists()


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tiny_vae())
    payload = torch.load(path, weights_only=True)
    assert load_checkpoint(path)[1]["format_version"] == FORMAT_VERSION
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such checkpoint"),
        (b"", "not a readable checkpoint"),
        ("truncate", "not a readable checkpoint"),
        ({"state_dict": {}}, "not a pyro_vae checkpoint"),
        ([1, 2], "not a pyro_vae checkpoint"),
        ({"format_version": FORMAT_VERSION, "config": {"data_dim": -1}}, "inconsistent"),
    ],
)
def test_broken_checkpoints_raise_one_line(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "ckpt.pt"
    if content == "truncate":
        save_checkpoint(path, tiny_vae())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_training_state_holds_only_plain_values(tmp_path: Path) -> None:
    train_tiny(tmp_path, 1, clip_norm=1.0)
    payload = torch.load(tmp_path / LAST, weights_only=True)

    def leaves(value: object) -> list[object]:
        if isinstance(value, dict):
            assert all(isinstance(k, (str, int)) for k in value)
            return [leaf for v in value.values() for leaf in leaves(v)]
        if isinstance(value, (list, tuple)):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]

    kinds = {type(leaf) for leaf in leaves(payload)}
    assert kinds <= {torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)}
    assert {"optimizer", "rng", "history", "best_valid_elbo", "epoch"} <= set(payload)
    vae, loaded = load_checkpoint(tmp_path / LAST)  # also a regular checkpoint
    assert loaded["epoch"] == 1 and vae.config.data_dim == 12


def fail_midway(write: object) -> object:
    """Wrap a writer so it writes some bytes into the temporary file, then crashes."""

    def broken(*args: object, **kwargs: object) -> None:
        target = next(a for a in args if isinstance(a, (str, Path)))
        Path(target).write_bytes(b"partial")
        raise OSError("disk full (injected)")

    return broken


def test_fault_during_checkpoint_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, tiny_vae(), epoch=1)

    def broken(self: Path, data: bytes) -> None:  # the serialized bytes stop halfway
        with open(self, "wb") as handle:
            handle.write(bytes(data)[: len(data) // 2])
        raise OSError("disk full (injected)")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError, match=f"cannot write {path}: disk full"):
        save_checkpoint(path, tiny_vae(seed=1), epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_fault_during_metrics_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.csv"
    write_metrics(path, [{"epoch": 1, "valid_elbo": -3.0}])
    before = path.read_text()

    class Broken:
        def __init__(self, handle: object, fieldnames: list[str]) -> None:
            self.handle = handle

        def writeheader(self) -> None:
            self.handle.write("epoch,valid_")
            raise OSError("disk full (injected)")

    monkeypatch.setattr("pyro_vae.run_dir.csv.DictWriter", Broken)
    with pytest.raises(OSError, match="injected"):
        write_metrics(path, [{"epoch": 1, "valid_elbo": -3.0}, {"epoch": 2, "valid_elbo": -2.0}])
    assert path.read_text() == before and before.splitlines()[0] == "epoch,valid_elbo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_fault_during_picture_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "samples.png"
    save_image_grid(path, torch.rand(4, 12), (3, 4))
    before = path.read_bytes()
    import matplotlib.image

    monkeypatch.setattr(matplotlib.image, "imsave", fail_midway(matplotlib.image.imsave))
    with pytest.raises(OSError, match="injected"):
        pictures.save_image_grid(path, torch.rand(4, 12), (3, 4))
    assert path.read_bytes() == before and before[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]


WRITER = """
import sys
import torch
from pyro_vae.checkpoint import save_checkpoint
from pyro_vae.model import VAE, VAEConfig
vae = VAE(VAEConfig(784, 50, (400, 400), "full"))
path = sys.argv[1]
for i in range(10**6):
    with torch.no_grad():
        next(vae.decoder.parameters()).fill_(i)
    save_checkpoint(path, vae, epoch=i)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_repeated_saves_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for delay in (0.0, 0.173):
        process = subprocess.Popen(
            [sys.executable, str(script), str(path)], env=env, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout.readline()  # one save has completed
            time.sleep(delay)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            process.stdout.close()
        vae, payload = load_checkpoint(path)
        assert torch.all(next(vae.decoder.parameters()) == payload["epoch"])
        for stale in tmp_path.glob(".checkpoint.pt.*.tmp"):  # a killed writer's leftovers
            stale.unlink()
