"""Datasets of binary images: load, validate, binarize and split; imports no Pyro."""

from __future__ import annotations

import gzip
import math
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "DataError",
    "DataSpec",
    "Dataset",
    "load_dataset",
    "minibatches",
]

DATASETS = ("digits", "binarized-mnist", "mnist", "array")
BINARIZE_MODES = ("static", "dynamic", "threshold")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data file or array that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True)
class DataSpec:
    """What to load: a dataset name, the user's file or folder, and how to binarize.

    Args:
        name: One of ``DATASETS``.
        path: File or folder for every dataset except ``digits``.
        binarize: ``static`` (one seeded Bernoulli draw), ``dynamic`` (train redrawn each
            epoch), ``threshold`` (x >= 0.5) or None for data already in {0, 1}.
        seed: Seed of the split and of static binarization (independent of training seeds).
    """

    name: str = "digits"
    path: str | None = None
    binarize: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise DataError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.binarize is not None and self.binarize not in BINARIZE_MODES:
            raise DataError(
                f"unknown binarize mode {self.binarize!r}; "
                f"choose one of {', '.join(BINARIZE_MODES)}"
            )
        if self.name == "digits" and self.path is not None:
            raise DataError("dataset 'digits' is built in and takes no path")
        if self.name != "digits" and not self.path:
            raise DataError(f"dataset {self.name!r} needs a path: --data {self.name} PATH")


@dataclass
class Dataset:
    """Train/valid/test images as float32 tensors of shape ``(N, P)``.

    Values are in {0, 1}, except ``train`` when ``dynamic`` is set: it then holds intensities
    in [0, 1] and :meth:`train_batch` draws a fresh binarization.
    """

    train: Tensor
    valid: Tensor
    test: Tensor | None
    image_shape: tuple[int, int]
    dynamic: bool = False

    @property
    def data_dim(self) -> int:
        return self.train.shape[-1]

    def split(self, name: str) -> Tensor:
        """The binary images of split ``name`` (``train`` drawn once if dynamic), ``(N, P)``."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        x = getattr(self, name)
        if x is None:
            raise DataError(f"this dataset has no {name!r} split; use --split valid")
        if name == "train" and self.dynamic:
            return torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
        return x

    def train_batch(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training images ``(B, P)`` at ``index``, binarized afresh when dynamic."""
        x = self.train[index]
        if self.dynamic:
            u = torch.rand(x.shape, generator=generator, device=x.device)
            return (u < x).to(x.dtype)
        return x

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every split on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(
            move(self.train), move(self.valid), move(self.test), self.image_shape, self.dynamic
        )


def load_dataset(spec: DataSpec) -> Dataset:
    """Load, validate, binarize and split the dataset that ``spec`` names."""
    if spec.name == "digits":
        return _load_digits(spec)
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if spec.name == "binarized-mnist":
        splits = _read_binarized_mnist(path)
        return _finish(spec, splits, source=str(path), default_binarize=None)
    if spec.name == "mnist":
        splits = _read_mnist_idx(path)
        return _finish(spec, splits, source=str(path), default_binarize="dynamic")
    return _finish(spec, _read_array(path), source=str(path), default_binarize=None)


def minibatches(
    num_data: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[Tensor]:
    """Shuffled index tensors covering ``range(num_data)`` once, each of size <= batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(num_data, generator=generator).to(device)
    yield from order.split(batch_size)


# ---------------------------------------------------------------- readers


def _load_digits(spec: DataSpec) -> Dataset:
    from sklearn.datasets import load_digits

    images = load_digits().data.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(images))
    test, valid, train = order[:300], order[300:500], order[500:]
    splits = {"train": images[train], "valid": images[valid], "test": images[test]}
    return _finish(spec, splits, source="digits", default_binarize="threshold")


def _read_binarized_mnist(path: Path) -> dict[str, np.ndarray]:
    """``.npz`` with train/valid[/test] or Larochelle & Murray ``.amat`` files."""
    if path.suffix == ".npz":
        splits = _read_npz(path)
        if "train" not in splits or "valid" not in splits:
            raise DataError(
                f"{path}: expected arrays 'train' and 'valid', found {sorted(splits) or 'none'}"
            )
        return splits
    folder = path if path.is_dir() else path.parent
    splits = {}
    for name in SPLITS:
        file = folder / f"binarized_mnist_{name}.amat"
        if file.exists():
            splits[name] = _read_amat(file)
    if "train" not in splits or "valid" not in splits:
        raise DataError(
            f"{path}: expected binarized_mnist_train.amat and "
            f"binarized_mnist_valid.amat (or an .npz with 'train' and 'valid')"
        )
    return splits


def _read_amat(file: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # an empty file is reported as an empty dataset
            warnings.filterwarnings("ignore", "loadtxt: input contained no data", UserWarning)
            return np.loadtxt(file, dtype=np.float32, ndmin=2)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{file}: not a whitespace-separated table of pixels ({error})") from None


def _read_mnist_idx(path: Path) -> dict[str, np.ndarray]:
    """The standard IDX files; the first 50,000 training images train, the rest validate."""
    if not path.is_dir():
        raise DataError(f"{path}: expected a folder holding train-images-idx3-ubyte[.gz]")
    train = _read_idx_images(_find_idx(path, "train-images-idx3-ubyte"))
    num_train = 50000 if len(train) > 50000 else max(1, int(round(0.9 * len(train))))
    splits = {"train": train[:num_train], "valid": train[num_train:]}
    if len(splits["valid"]) == 0:
        raise DataError(
            f"{path}: too few training images ({len(train)}) to hold out a validation split"
        )
    test_file = _find_idx(path, "t10k-images-idx3-ubyte", required=False)
    if test_file is not None:
        splits["test"] = _read_idx_images(test_file)
    return {k: v.astype(np.float32) / 255.0 for k, v in splits.items()}


def _find_idx(folder: Path, stem: str, required: bool = True) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx")):
        if candidate.exists():
            return candidate
    if required:
        raise DataError(f"{folder}: no {stem} or {stem}.gz")
    return None


def _read_idx_images(file: Path) -> np.ndarray:
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{file}: cannot read ({error})") from None
    if len(raw) < 16 or struct.unpack(">I", raw[:4])[0] != 0x00000803:
        raise DataError(f"{file}: not an IDX image file (bad magic number)")
    count, rows, cols = struct.unpack(">III", raw[4:16])
    expected = 16 + count * rows * cols
    if len(raw) != expected:
        raise DataError(f"{file}: truncated or padded: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows * cols)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read as .npz ({error})") from None


def _read_array(path: Path) -> dict[str, np.ndarray]:
    """An ``.npy`` array, or an ``.npz`` holding one array or train/valid[/test]."""
    if path.suffix == ".npy":
        try:
            return {"all": np.load(path, allow_pickle=False)}
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f"{path}: cannot read as .npy ({error})") from None
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a .npy or .npz file")
    splits = _read_npz(path)
    if "train" in splits:
        return splits
    if len(splits) != 1:
        raise DataError(
            f"{path}: expected one array or 'train'/'valid'/'test', found {sorted(splits)}"
        )
    return {"all": next(iter(splits.values()))}


# ---------------------------------------------------------------- checks and binarization


def _finish(
    spec: DataSpec, splits: dict[str, np.ndarray], source: str, default_binarize: str | None
) -> Dataset:
    """Validate each split, split a single array, binarize, and wrap as a Dataset."""
    mode = spec.binarize if spec.binarize is not None else default_binarize
    arrays = {
        name: _check_pixels(array, f"{source} [{name}]", mode) for name, array in splits.items()
    }
    dims = {array.shape[1] for array in arrays.values()}
    if len(dims) != 1:
        raise DataError(f"{source}: splits have different pixel counts {sorted(dims)}")
    if "all" in arrays:
        arrays = _split(arrays.pop("all"), source, spec.seed)
    if "valid" not in arrays:
        arrays["valid"], arrays["train"] = _hold_out(arrays["train"], source, spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        for name, a in arrays.items()
    }
    out = {
        name: _binarize(t, mode, generator, keep=(mode == "dynamic" and name == "train"))
        for name, t in tensors.items()
    }
    return Dataset(
        out["train"],
        out["valid"],
        out.get("test"),
        _image_shape(out["train"].shape[1]),
        dynamic=(mode == "dynamic"),
    )


def _check_pixels(array: np.ndarray, where: str, mode: str | None) -> np.ndarray:
    """Rank-2 (or rank-3 images), non-empty, finite, in {0,1} (or [0,1] with a binarize mode)."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = getattr(getattr(array, "dtype", None), "name", type(array).__name__)
        raise DataError(f"{where}: expected a numeric array, got {kind}")
    if array.ndim == 3:
        array = array.reshape(array.shape[0], array.shape[1] * array.shape[2])
    if array.ndim != 2:
        raise DataError(f"{where}: expected shape (N, P) or (N, H, W), got {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{where}: empty dataset, shape {tuple(array.shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{where}: contains NaN or inf pixels")
    low, high = float(array.min()), float(array.max())
    if mode is None and not np.isin(array, (0.0, 1.0)).all():
        raise DataError(
            f"{where}: values must be in {{0, 1}} (found range [{low:g}, {high:g}]); "
            "for intensities in [0, 1] pass --binarize static|dynamic|threshold"
        )
    if low < 0.0 or high > 1.0:
        raise DataError(f"{where}: values must be in [0, 1] (found range [{low:g}, {high:g}])")
    return array


def _split(array: np.ndarray, source: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded 80/10/10 split of one array."""
    n = array.shape[0]
    if n < 3:
        raise DataError(f"{source}: {n} images are too few to split into train/valid/test")
    order = np.random.default_rng(seed).permutation(n)
    num_valid = num_test = max(1, n // 10)
    return {
        "test": array[order[:num_test]],
        "valid": array[order[num_test : num_test + num_valid]],
        "train": array[order[num_test + num_valid :]],
    }


def _hold_out(train: np.ndarray, source: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 10% of train as validation data when the file has none."""
    if train.shape[0] < 2:
        raise DataError(f"{source}: {train.shape[0]} training images are too few to validate on")
    order = np.random.default_rng(seed).permutation(train.shape[0])
    num_valid = max(1, train.shape[0] // 10)
    return train[order[:num_valid]], train[order[num_valid:]]


def _binarize(x: Tensor, mode: str | None, generator: torch.Generator, keep: bool) -> Tensor:
    if mode is None or keep:
        return x
    if mode == "threshold":
        return (x >= 0.5).float()
    return torch.bernoulli(x, generator=generator)


def _image_shape(num_pixels: int) -> tuple[int, int]:
    side = math.isqrt(num_pixels)
    return (side, side) if side * side == num_pixels else (1, num_pixels)
