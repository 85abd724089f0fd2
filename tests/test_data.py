"""Data loaders: every format, binarization modes, splits and the errors for bad files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.data import (
    DATASETS,
    DataError,
    Dataset,
    DatasetReader,
    DataSpec,
    load_dataset,
    minibatches,
    register_dataset,
)


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
    magic = 0x00000803 if images.ndim == 3 else 0x00000801  # images, or labels
    header = struct.pack(f">I{images.ndim}I", magic, *images.shape)
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
    assert torch.equal(amat.split("test"), torch.from_numpy(splits["test"]).float())


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


# ---------------------------------------------------------------- pixel views and labels


def test_digits_views_are_sklearns_data_after_the_split() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    index = {"test": order[:300], "valid": order[300:500], "train": order[500:]}
    views = {p: load_dataset(DataSpec(pixels=p)) for p in ("count", "unit-interval", "real")}
    binary = load_dataset(DataSpec())
    for name, i in index.items():
        count, unit = views["count"].split(name), views["unit-interval"].split(name)
        assert torch.equal(count, torch.from_numpy(digits.data[i].astype(np.float32)))
        assert torch.equal(unit, count / 16) and torch.equal(views["real"].split(name), unit)
        old = torch.from_numpy(digits.data.astype(np.float32) / 16.0)[i]  # the binary recipe
        assert torch.equal(binary.split(name), (old >= 0.5).float())
        assert torch.equal(binary.split(name), (unit >= 0.5).float())
        expected = torch.from_numpy(digits.target[i]).long()
        assert all(torch.equal(d.labels(name), expected) for d in (binary, *views.values()))
    assert (views["count"].levels, binary.levels, views["unit-interval"].levels) == (16, 1, None)
    assert binary.num_classes == 10 and views["count"].pixels == "count"


def test_mnist_labels_follow_the_images_and_counts_are_the_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (30, 4, 4)), rng.integers(0, 256, (5, 4, 4))
    train[:, 0, 0], test[:, 0, 0] = np.arange(30) % 10, np.arange(5) % 10  # label in pixel 0
    _write_idx(tmp_path / "train-images-idx3-ubyte", train, compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test, compress=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30) % 10, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5) % 10, compress=False)
    count = load_dataset(DataSpec("mnist", str(tmp_path), pixels="count"))
    assert count.levels == 255 and not count.dynamic and count.num_classes == 10
    assert torch.equal(count.train, torch.from_numpy(train[:27].reshape(27, 16)).float())
    unit = load_dataset(DataSpec("mnist", str(tmp_path), pixels="unit-interval"))
    binary = load_dataset(DataSpec("mnist", str(tmp_path)))
    for name in ("train", "valid", "test"):
        assert torch.equal(count.labels(name), count.split(name)[:, 0].long())
        assert torch.equal(unit.split(name), count.split(name) / 255)
        assert torch.equal(binary.labels(name), count.labels(name))
    assert torch.equal(binary.train, unit.train)  # dynamic: intensities kept for redrawing
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4), compress=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: 4 labels for 5 images"):
        load_dataset(DataSpec("mnist", str(tmp_path)))


def test_mnist_without_label_files_has_no_labels(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.ones((10, 2, 2)), compress=False)
    data = load_dataset(DataSpec("mnist", str(tmp_path), pixels="real"))
    assert data.labels("train") is None and data.num_classes is None and data.levels is None


def test_array_labels_follow_the_80_10_10_split(tmp_path: Path) -> None:
    images = np.stack([np.arange(40), np.arange(40) % 4], axis=1)  # (index, label)
    np.savez(tmp_path / "x.npz", images=images, labels=np.arange(40) % 4)
    for seed in (0, 1):
        data = load_dataset(DataSpec("array", str(tmp_path / "x.npz"), seed=seed, pixels="count"))
        assert data.levels == 39 and data.num_classes == 4
        for name in ("train", "valid", "test"):
            assert torch.equal(data.labels(name), data.split(name)[:, 1].long())
        index = torch.cat([data.train, data.valid, data.test])[:, 0]
        assert sorted(index.tolist()) == list(range(40))


def test_array_labels_follow_the_held_out_validation_split(tmp_path: Path) -> None:
    images = np.stack([np.arange(20) % 2, np.arange(20) % 2], axis=1)
    np.savez(tmp_path / "x.npz", train=images, train_labels=np.arange(20) % 2)
    data = load_dataset(DataSpec("array", str(tmp_path / "x.npz")))
    assert (len(data.train), len(data.valid)) == (18, 2)
    for name in ("train", "valid"):
        assert torch.equal(data.labels(name), data.split(name)[:, 0].long())
    assert data.labels("test") is None


def test_array_views_keep_the_stored_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(30, 5))
    np.save(tmp_path / "x.npy", stored)
    real = load_dataset(DataSpec("array", str(tmp_path / "x.npy"), pixels="real"))
    assert real.levels is None and real.pixels == "real"
    rows = {tuple(r) for r in stored.astype(np.float32).tolist()}
    assert {tuple(r) for t in (real.train, real.valid, real.test) for r in t.tolist()} == rows
    np.save(tmp_path / "u.npy", rng.random((30, 5)))
    unit = load_dataset(DataSpec("array", str(tmp_path / "u.npy"), pixels="unit-interval"))
    assert bool(((unit.train >= 0) & (unit.train <= 1)).all()) and unit.train.max() < 1


def test_array_count_levels_cover_every_split(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", train=np.full((4, 2), 3), valid=np.array([[0, 5]]))
    data = load_dataset(DataSpec("array", str(tmp_path / "x.npz"), pixels="count"))
    assert data.levels == 5  # a Binomial with L trials must cover the validation images too
    np.savez(tmp_path / "z.npz", train=np.zeros((4, 2)), valid=np.zeros((1, 2)))
    assert load_dataset(DataSpec("array", str(tmp_path / "z.npz"), pixels="count")).levels == 1


def test_old_specs_and_positional_calls_still_mean_binary_pixels() -> None:
    stored = {"name": "digits", "path": None, "binarize": "static", "seed": 2}
    spec = DataSpec(**stored)
    assert spec == DataSpec("digits", None, "static", 2) and spec.pixels == "binary"
    assert load_dataset(spec).pixels == "binary"


@pytest.mark.parametrize(
    "arrays, pixels, message",
    [
        (dict(x=np.array([[0, 1, -1]] * 5)), "count", r"non-negative integers \(found -1\)"),
        (dict(x=np.array([[0, 1.5, 2]] * 5)), "count", r"non-negative integers \(found 1.5\)"),
        (dict(x=np.array([[0, np.inf, 2]] * 5)), "count", "NaN or inf"),
        (dict(x=np.array([[0, 1.5, 2]] * 5)), "unit-interval", r"\[0, 1\].*\[0, 2\]"),
        (dict(x=np.array([[0, np.nan]] * 5)), "real", "NaN"),
        (dict(x=np.ones((5, 2)), labels=np.arange(4)), "count", r"expected 5 labels .* \(4,\)"),
        (dict(x=np.ones((5, 2)), labels=np.ones((5, 1))), "count", r"shape \(5, 1\)"),
        (dict(x=np.ones((5, 2)), labels=np.full(5, 0.5)), "real", r"integers \(found 0.5\)"),
        (dict(x=np.ones((5, 2)), labels=np.full(5, -1)), "real", r"integers \(found -1\)"),
        (dict(x=np.ones((5, 2)), labels=np.array(["a"] * 5)), "real", "integer labels"),
        (dict(train=np.ones((5, 2)), test_labels=np.ones(5)), "real", "'test' that holds no"),
    ],
)
def test_bad_views_and_labels_are_rejected_with_the_rule(
    tmp_path: Path, arrays: dict, pixels: str, message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(DataSpec("array", str(tmp_path / "bad.npz"), pixels=pixels))
    assert "\n" not in str(info.value) and "bad.npz" in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(binarize="static", pixels="count"), "binarize applies to binary pixels only"),
        (dict(binarize="dynamic", pixels="real"), "got pixels 'real'"),
        (dict(pixels="grey"), "no pixels 'grey'"),
    ],
)
def test_bad_pixel_specs_are_rejected(spec: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        DataSpec(**spec)


def test_dataset_checks_labels_and_moves_them() -> None:
    x = torch.zeros(4, 3)
    with pytest.raises(DataError, match="valid_labels of shape"):
        Dataset(x, x, None, (1, 3), valid_labels=torch.zeros(3, dtype=torch.long))
    data = Dataset(x, x[:2], None, (1, 3), train_labels=torch.arange(4))
    assert data.levels == 1 and data.num_classes == 4 and data.labels("valid") is None
    moved = data.to("cpu")
    assert torch.equal(moved.train_labels, data.train_labels) and moved.levels == 1
    with pytest.raises(DataError, match="unknown split"):
        data.labels("dev")


def test_register_dataset_refuses_a_duplicate_key() -> None:
    before = dict(DATASETS)
    with pytest.raises(ValueError, match="'digits' is already registered by DigitsReader"):

        @register_dataset("digits")
        class Other(DatasetReader):
            pass

    assert DATASETS == before


def test_a_registered_reader_is_loaded_by_name() -> None:
    @register_dataset("ramp")
    class RampReader(DatasetReader):
        needs_path, levels = False, 4

        @classmethod
        def read(cls, path: Path | None, seed: int) -> dict[str, np.ndarray]:
            return {"all": np.arange(50).reshape(10, 5) % 5, "all_labels": np.arange(10) % 2}

    try:
        assert RampReader.key == "ramp"
        data = load_dataset(DataSpec("ramp", pixels="unit-interval"))
        assert data.data_dim == 5 and float(data.train.max()) == 1.0 and data.num_classes == 2
        with pytest.raises(DataError, match="takes no path"):
            DataSpec("ramp", "x.npy")
    finally:
        del DATASETS["ramp"]


def test_binary_integer_files_stay_bytes_and_read_as_floats(tmp_path: Path) -> None:
    """Binary images are held as uint8 (a quarter of float32) whether stored as integers
    (taken without a float copy) or floats, and read per split as floats."""
    rng = np.random.default_rng(0)
    images = (rng.random((40, 16)) < 0.3).astype(np.uint8)
    np.save(tmp_path / "bytes.npy", images)
    np.save(tmp_path / "floats.npy", images.astype(np.float32))
    compact = load_dataset(DataSpec("array", str(tmp_path / "bytes.npy")))
    wide = load_dataset(DataSpec("array", str(tmp_path / "floats.npy")))
    for name in ("train", "valid", "test"):
        assert getattr(compact, name).dtype == torch.uint8
        assert torch.equal(compact.split(name), wide.split(name))  # the same split, as floats
        assert compact.split(name).dtype == torch.float32
    assert wide.train.dtype == torch.uint8
    assert compact.nbytes() == wide.nbytes() == 40 * 16  # one byte a pixel
    np.save(tmp_path / "two.npy", images * 2)
    with pytest.raises(DataError, match=r"values must be in \{0, 1\} \(found range \[0, 2\]\)"):
        load_dataset(DataSpec("array", str(tmp_path / "two.npy")))
