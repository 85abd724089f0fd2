"""Data loaders: every format, binarization modes, splits and the errors for bad files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.data import DataError, DataSpec, load_dataset, minibatches


def _is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def test_digits_split_is_fixed_disjoint_and_binary() -> None:
    a, b = load_dataset(DataSpec()), load_dataset(DataSpec())
    assert (a.train.shape, a.valid.shape, a.test.shape) == ((1297, 64), (200, 64), (300, 64))
    assert torch.equal(a.train, b.train) and a.image_shape == (8, 8)
    assert all(_is_binary(t) for t in (a.train, a.valid, a.test))
    other = load_dataset(DataSpec(seed=1))
    assert not torch.equal(a.test, other.test)


def _write_idx(path: Path, images: np.ndarray, compress: bool) -> None:
    header = struct.pack(">IIII", 0x00000803, *images.shape)
    payload = header + images.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_with_each_binarization(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 4, 4)), compress)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 4, 4)), compress)
    dynamic = load_dataset(DataSpec("mnist", str(tmp_path)))
    assert dynamic.dynamic and dynamic.data_dim == 16 and dynamic.test.shape == (5, 16)
    assert dynamic.train.shape[0] + dynamic.valid.shape[0] == 30
    assert not _is_binary(dynamic.train) and _is_binary(dynamic.valid)
    g = torch.Generator().manual_seed(0)
    first, second = (
        dynamic.train_batch(torch.arange(10), g),
        dynamic.train_batch(torch.arange(10), g),
    )
    assert _is_binary(first) and not torch.equal(first, second)
    threshold = load_dataset(DataSpec("mnist", str(tmp_path), binarize="threshold"))
    expected = (dynamic.train >= 0.5).float()
    assert torch.equal(threshold.train, expected) and not threshold.dynamic
    static = load_dataset(DataSpec("mnist", str(tmp_path), binarize="static"))
    assert _is_binary(static.train) and torch.equal(
        static.train_batch(torch.arange(3)), static.train[:3]
    )


def test_truncated_idx_file_is_rejected(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 2, 2)), compress=False)
    file = tmp_path / "train-images-idx3-ubyte"
    file.write_bytes(file.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataSpec("mnist", str(tmp_path)))
    file.write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 20)
    with pytest.raises(DataError, match="magic"):
        load_dataset(DataSpec("mnist", str(tmp_path)))


def test_binarized_mnist_npz_and_amat(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    splits = {
        k: rng.integers(0, 2, (n, 9)).astype(np.uint8)
        for k, n in (("train", 20), ("valid", 6), ("test", 4))
    }
    np.savez(tmp_path / "bm.npz", train=splits["train"], valid=splits["valid"])
    data = load_dataset(DataSpec("binarized-mnist", str(tmp_path / "bm.npz")))
    assert torch.equal(data.train, torch.from_numpy(splits["train"]).float())
    assert data.test is None and data.image_shape == (3, 3)
    with pytest.raises(DataError, match="no 'test' split"):
        data.split("test")
    for name, array in splits.items():
        np.savetxt(tmp_path / f"binarized_mnist_{name}.amat", array, fmt="%d")
    amat = load_dataset(DataSpec("binarized-mnist", str(tmp_path)))
    assert torch.equal(amat.test, torch.from_numpy(splits["test"]).float())


def test_plain_array_is_split_80_10_10_and_binarized_on_request(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((50, 8)))
    with pytest.raises(DataError, match=r"values must be in \{0, 1\}.*--binarize"):
        load_dataset(DataSpec("array", str(tmp_path / "x.npy")))
    data = load_dataset(DataSpec("array", str(tmp_path / "x.npy"), binarize="static"))
    assert (data.train.shape[0], data.valid.shape[0], data.test.shape[0]) == (40, 5, 5)
    rows = {tuple(r) for t in (data.train, data.valid, data.test) for r in t.tolist()}
    assert len(rows) > 40 and _is_binary(data.train)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 4)), "empty"),
        (np.zeros(5), "shape"),
        (np.zeros((2, 2, 2, 2)), "shape"),
        (np.array([[0, 1, np.nan, 0]] * 5), "NaN"),
        (np.array([[0, 1, 2, 0]] * 5), r"\{0, 1\}"),
        (np.array([["a", "b"]] * 5), "numeric"),
    ],
)
def test_bad_arrays_are_rejected_with_the_rule(
    tmp_path: Path, array: np.ndarray, message: str
) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        load_dataset(DataSpec("array", str(tmp_path / "bad.npy")))


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(name="cifar"), "unknown dataset"),
        (dict(name="mnist"), "needs a path"),
        (dict(name="digits", path="x.npy"), "takes no path"),
        (dict(binarize="sometimes"), "binarize"),
        (dict(name="array", path="/nonexistent/x.npy"), "no such file"),
    ],
)
def test_bad_specs_are_rejected(spec: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(DataSpec(**spec))


def test_minibatches_cover_every_index_once() -> None:
    batches = list(minibatches(23, 5, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(batches).tolist()) == list(range(23))
