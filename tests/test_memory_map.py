"""A ``.npy`` file of bytes is memory-mapped: split without a copy, read a minibatch at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import TrainConfig, fit
from pyro_vae.data import DataSpec, load_dataset
from pyro_vae.model import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


def _images(tmp_path: Path, n: int = 50, p: int = 12) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images = (rng.random((n, p)) < 0.3).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.savez(tmp_path / "images.npz", images=images)  # read into memory: the reference
    return tmp_path / "images.npy", tmp_path / "images.npz"


def test_a_mapped_file_gives_the_splits_and_batches_of_one_read_into_memory(
    tmp_path: Path,
) -> None:
    mapped_path, read_path = _images(tmp_path)
    mapped = load_dataset(DataSpec("array", str(mapped_path)))
    read = load_dataset(DataSpec("array", str(read_path)))
    assert read.train_rows is None and mapped.train_rows is not None
    assert mapped.train.shape[0] == 50 and mapped.num_train == read.num_train == 40
    for name in ("train", "valid", "test"):
        assert torch.equal(mapped.split(name), read.split(name)), name
    index = torch.tensor([3, 0, 39, 7])
    assert torch.equal(mapped.train_batch(index), read.train_batch(index))
    assert torch.equal(mapped.first_train(5).split("train"), read.split("train")[:5])
    histories = []
    for data in (mapped, read):
        torch.manual_seed(0)
        vae = VAE(VAEConfig(12, 2, (6,), "diagonal"))
        histories.append(fit(vae, data, TrainConfig(num_epochs=2, batch_size=8), progress=False))
    assert [r["train_elbo"] for r in histories[0]] == [r["train_elbo"] for r in histories[1]]


_UNDER_A_LIMIT = """
import json, resource, sys
import torch
from pyro_vae import TrainConfig, fit
from pyro_vae.data import DataSpec, load_dataset
from pyro_vae.model import VAE, VAEConfig

path, mapped, headroom = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
from pyro_vae import Dataset  # train once on tiny data first: later lazy imports need memory
tiny = torch.bernoulli(torch.full((40, 128), 0.5)).to(torch.uint8)
tiny = Dataset(tiny, tiny[:8], None, (1, 128))
fit(VAE(VAEConfig(128, 2, (4,), "diagonal")), tiny, TrainConfig(num_epochs=1, batch_size=20),
    progress=False)
status = open("/proc/self/status").read().split("VmData:")[1].split()[0]
limit = int(status) * 1024 + headroom  # private memory in use now, plus the headroom
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
try:
    if mapped:
        data = load_dataset(DataSpec("array", path))
    else:  # the same file read into memory
        import numpy as np
        array = np.load(path)
        data = None
    if data is not None:
        torch.manual_seed(0)
        vae = VAE(VAEConfig(data.data_dim, 2, (4,), "diagonal"))
        history = fit(vae, data, TrainConfig(num_epochs=1, batch_size=4000), progress=False)
        print(json.dumps({"trained": True, "rows": data.num_train,
                          "elbo": history[-1]["valid_elbo"]}))
    else:
        print(json.dumps({"trained": False}))
except MemoryError:
    print(json.dumps({"memory_error": True}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_file_larger_than_the_memory_limit_trains(tmp_path: Path) -> None:
    """RLIMIT_DATA bounds private memory; a read-only map of the file does not count."""
    n, p = 1_200_000, 128  # 154 MB of bytes; the limit leaves 90 MB of headroom
    path = tmp_path / "big.npy"
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, p))
    for start in range(0, n, 200_000):
        images[start : start + 200_000] = rng.random((200_000, p)) < 0.2
    images.flush()
    del images
    headroom = 90 * 2**20  # the valid and test splits (copied) take 31 MB of it
    assert path.stat().st_size > headroom

    def run(mapped: bool) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_UNDER_A_LIMIT), str(path),
             "1" if mapped else "0", str(headroom)],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run(mapped=False) == {"memory_error": True}  # the limit binds ...
    result = run(mapped=True)  # ... and the mapped file trains under it
    assert result["trained"] and result["rows"] == n - 2 * (n // 10)
    assert np.isfinite(result["elbo"])
