"""The dataset registry, what to load (DataSpec), what is loaded (Dataset), and the checks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..validation import check_instance, check_key, check_positive_int, check_seed, registrar

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "PIXEL_KINDS",
    "SPLITS",
    "DataError",
    "DataSpec",
    "Dataset",
    "DatasetReader",
    "example_images",
    "load_dataset",
    "minibatches",
    "register_dataset",
]

BINARIZE_MODES = ("static", "dynamic", "threshold")
PIXEL_KINDS = ("binary", "unit-interval", "count", "real")
SPLITS = ("train", "valid", "test")
_MAX_COUNT = 2**24  # the largest integer float32 holds exactly with all below it


class DataError(ValueError):
    """A data file or array that cannot be used; the message names the file and the rule."""


class DatasetReader:
    """One data source: what it needs and supports, and how to read its stored arrays.

    A new dataset is one subclass decorated with ``@register_dataset("key")``; loading,
    checking, splitting and the pixel views are shared (:func:`load_dataset`).

    Attributes:
        key: The registry key, set by :func:`register_dataset`.
        needs_path: Whether the source is a user's file or folder (False: built in).
        levels: Integer intensity levels L of the stored pixels (values 0..L), or None when
            the stored values are presented as they are.
        default_binarize: Binarization of the ``binary`` view when the spec names none.
        pixel_kinds: The pixel views the source can give, a subset of ``PIXEL_KINDS``.
        has_labels: Whether the source carries class labels.
    """

    key: ClassVar[str]
    needs_path: ClassVar[bool] = True
    levels: ClassVar[int | None] = None
    default_binarize: ClassVar[str | None] = None
    pixel_kinds: ClassVar[tuple[str, ...]] = PIXEL_KINDS
    has_labels: ClassVar[bool] = False

    @classmethod
    def read(cls, path: Path | None, seed: int) -> dict[str, np.ndarray]:
        """The stored arrays, unscaled.

        Args:
            path: The user's file or folder (it exists), None when ``needs_path`` is False.
            seed: Seed of any split the reader makes itself.

        Returns:
            Images under ``train``, ``valid`` and optionally ``test`` (or one array under
            ``all``, split 80/10/10), each ``(N, P)`` or ``(N, H, W)``; optional labels ``(N,)``
            under ``train_labels``, ``valid_labels``, ``test_labels`` (or ``all_labels``).
            Unreadable input raises :class:`DataError`.
        """
        raise NotImplementedError

    @classmethod
    def write_example(cls, folder: Path) -> str | None:
        """Write :func:`example_images` in this source's format under ``folder``.

        Returns:
            The path to pass as ``DataSpec.path``, or None for a built-in source.
        """
        raise NotImplementedError


DATASETS: dict[str, type[DatasetReader]] = {}
register_dataset = registrar(DATASETS, "dataset")


def example_images(num_images: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """The tiny source each reader's ``write_example`` stores (scaled to its ``levels``).

    Image ``i`` has 16 pixels in {0, 1}: pixels 0..2 one-hot encode its label ``i % 3`` and
    pixels 3..15 its index ``i`` in binary, so images are distinct and carry their labels.

    Returns:
        uint8 images ``(N, 16)`` and int64 labels ``(N,)``.
    """
    index = np.arange(num_images)
    labels = index % 3
    bits = (index[:, None] >> np.arange(13)) & 1
    images = np.concatenate([np.eye(3, dtype=np.int64)[labels], bits], axis=1)
    return images.astype(np.uint8), labels.astype(np.int64)


@dataclass(frozen=True)
class DataSpec:
    """What to load: a dataset, the user's file or folder, binarization and the pixel view.

    Args:
        name: A key of ``DATASETS``.
        path: File or folder for every dataset that needs one (all but ``digits``).
        binarize: For ``binary`` pixels: ``static`` (one seeded Bernoulli draw), ``dynamic``
            (train redrawn each epoch), ``threshold`` (x >= 0.5) or None for the reader's
            default (data already in {0, 1} when it has none).
        seed: Seed of the split and of static binarization (independent of training seeds).
        pixels: One of ``PIXEL_KINDS``: ``binary`` {0, 1}; ``unit-interval`` intensities in
            [0, 1]; ``count`` the stored integers 0..L; ``real`` any finite value.
    """

    name: str = "digits"
    path: str | None = None
    binarize: str | None = None
    seed: int = 0
    pixels: str = "binary"

    def __post_init__(self) -> None:
        try:
            check_key(DATASETS, "dataset", self.name)
            check_seed("seed", self.seed)
        except ValueError as error:
            raise DataError(str(error)) from None
        if self.path is not None and not isinstance(self.path, (str, Path)):
            raise TypeError(f"path must be a str or Path, got {type(self.path).__name__}")
        reader = DATASETS[self.name]
        if self.binarize is not None and self.binarize not in BINARIZE_MODES:
            raise DataError(
                f"unknown binarize mode {self.binarize!r}; "
                f"choose one of {', '.join(BINARIZE_MODES)}"
            )
        if self.pixels not in reader.pixel_kinds:
            raise DataError(
                f"dataset {self.name!r} has no pixels {self.pixels!r}; "
                f"choose one of {', '.join(reader.pixel_kinds)}"
            )
        if self.binarize is not None and self.pixels != "binary":
            raise DataError(
                f"binarize applies to binary pixels only, got pixels {self.pixels!r} "
                f"with binarize {self.binarize!r}"
            )
        if not reader.needs_path and self.path is not None:
            raise DataError(f"dataset {self.name!r} is built in and takes no path")
        if reader.needs_path and not self.path:
            raise DataError(f"dataset {self.name!r} needs a path: --data {self.name} PATH")


@dataclass
class Dataset:
    """Train/valid/test images ``(N, P)``, with optional int64 labels ``(N,)``.

    Binary and count pixels are held as uint8 (a quarter of float32's memory, on the host
    and on a device); :meth:`split` and :meth:`train_batch` give float32 tensors, so read
    images through them. Other pixels are float tensors.

    ``pixels`` says what the values are (see :class:`DataSpec`). For ``binary`` they are in
    {0, 1}, except ``train`` when ``dynamic`` is set: it then holds intensities in [0, 1] and
    :meth:`train_batch` draws a fresh binarization. ``levels`` is the number of trials L of
    the view (1 for binary pixels, the largest count for count pixels, None otherwise).

    ``train_rows`` (int64 ``(N_train,)``), when set, names the rows of ``train`` that form
    the training split: a memory-mapped ``.npy`` file is split without a copy, and each
    minibatch reads only its own rows. Count training images with :attr:`num_train`.
    """

    train: Tensor
    valid: Tensor
    test: Tensor | None
    image_shape: tuple[int, int]
    dynamic: bool = False
    train_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    test_labels: Tensor | None = None
    levels: int | None = None
    pixels: str = "binary"
    train_rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.pixels not in PIXEL_KINDS:
            raise DataError(
                f"unknown pixels {self.pixels!r}; choose one of {', '.join(PIXEL_KINDS)}"
            )
        if self.pixels == "binary" and self.levels is None:
            self.levels = 1
        for name in SPLITS:
            x, labels = getattr(self, name), getattr(self, f"{name}_labels")
            rows = None if x is None else x.shape[0]
            if name == "train" and self.train_rows is not None:
                rows = self.train_rows.shape[0]
            if labels is not None and (x is None or labels.shape[0] != rows):
                shape = None if x is None else (rows, x.shape[1])
                raise DataError(
                    f"{name}_labels of shape {tuple(labels.shape)} do not match images {shape}"
                )

    @property
    def data_dim(self) -> int:
        return self.train.shape[-1]

    @property
    def num_train(self) -> int:
        """The number of training images."""
        rows = self.train_rows
        return self.train.shape[0] if rows is None else rows.shape[0]

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype :meth:`split` and :meth:`train_batch` return."""
        dtype = self.train.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def nbytes(self) -> int:
        """Bytes of the images of every split (of a mapped training split, its rows')."""
        splits = [getattr(self, name) for name in SPLITS]
        total = sum(x.numel() * x.element_size() for x in splits[1:] if x is not None)
        return total + self.num_train * self.data_dim * self.train.element_size()

    @property
    def num_classes(self) -> int | None:
        """The largest label plus one over every split, or None without labels."""
        present = [self.labels(name) for name in SPLITS]
        present = [t for t in present if t is not None and t.numel() > 0]
        return max(int(t.max()) for t in present) + 1 if present else None

    def split(self, name: str) -> Tensor:
        """The images of split ``name`` (``train`` drawn once if dynamic), ``(N, P)``."""
        _check_split(name)
        x = getattr(self, name)
        if x is None:
            raise DataError(f"this dataset has no {name!r} split; use --split valid")
        if name == "train" and self.train_rows is not None:
            x = x[self.train_rows]
        if name == "train" and self.dynamic:
            return torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
        return x.to(self.float_dtype)

    def labels(self, name: str) -> Tensor | None:
        """The int64 labels ``(N,)`` of split ``name`` in the order of its images, or None."""
        _check_split(name)
        return getattr(self, f"{name}_labels")

    def train_batch(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training images ``(B, P)`` at ``index`` as floats, binarized afresh when dynamic."""
        if self.train_rows is not None:
            index = self.train_rows[index]
        x = self.train[index].to(self.float_dtype)
        if self.dynamic:
            u = torch.rand(x.shape, generator=generator, device=x.device)
            return (u < x).to(x.dtype)
        return x

    def first_train(self, num_images: int) -> Dataset:
        """The same data with only the first ``num_images`` training images (and labels)."""
        check_positive_int("num_images", num_images)
        rows = None if self.train_rows is None else self.train_rows[:num_images]
        train = self.train if rows is not None else self.train[:num_images]
        labels = None if self.train_labels is None else self.train_labels[:num_images]
        return replace(self, train=train, train_rows=rows, train_labels=labels)

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every split and its labels on ``device`` (on the CPU a memory-mapped
        training split stays mapped; elsewhere only its training rows are moved)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        data = self
        if self.train_rows is not None and torch.device(device).type != "cpu":
            data = replace(self, train=self.train[self.train_rows], train_rows=None)
        tensors = {name: move(getattr(data, name)) for name in SPLITS}
        labels = {f"{name}_labels": move(data.labels(name)) for name in SPLITS}
        return replace(data, **tensors, **labels, train_rows=move(data.train_rows))


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")


def load_dataset(spec: DataSpec) -> Dataset:
    """Read, check, split and present (binarize, scale) the dataset that ``spec`` names."""
    check_instance("spec", spec, DataSpec, "e.g. load_dataset(DataSpec('digits'))")
    reader = DATASETS[spec.name]
    if not reader.needs_path:
        return _finish(spec, reader, reader.read(None, spec.seed), spec.name)
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    return _finish(spec, reader, reader.read(path, spec.seed), str(path))


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


# ---------------------------------------------------------------- checks, splits, views


def _finish(
    spec: DataSpec, reader: type[DatasetReader], raw: dict[str, np.ndarray], source: str
) -> Dataset:
    """Check each split and its labels, split, binarize, and wrap as a Dataset."""
    mode = spec.binarize if spec.binarize is not None else reader.default_binarize
    mode = mode if spec.pixels == "binary" else None  # the other views are never binarized
    keys = [key for key in raw if not key.endswith("_labels")]
    arrays = {
        key: _check_pixels(raw[key], f"{source} [{key}]", spec.pixels, mode, reader.levels)
        for key in keys
    }
    dims = {array.shape[1] for array in arrays.values()}
    if len(dims) != 1:
        raise DataError(f"{source}: splits have different pixel counts {sorted(dims)}")
    labels = _check_labels(raw, arrays, source)
    arrays, labels, train_rows = _make_splits(arrays, labels, source, spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    out = {}
    for name, array in arrays.items():  # in the reader's order: static draws depend on it
        if array.dtype == np.uint8:  # binary images stored as bytes stay bytes (and mapped)
            with warnings.catch_warnings():  # a read-only map: nothing here writes to it
                warnings.filterwarnings("ignore", "The given NumPy array is not writ")
                x = torch.from_numpy(np.ascontiguousarray(array))  # a C-order map: no copy
        else:
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        out[name] = _binarize(x, mode, generator, keep=(mode == "dynamic" and name == "train"))
    tags = {f"{name}_labels": torch.from_numpy(t) for name, t in labels.items() if name in SPLITS}
    if spec.pixels in ("binary", "count"):  # held compactly, floats per batch
        for name, x in out.items():
            if not (mode == "dynamic" and name == "train") and float(x.max()) <= 255:
                out[name] = x.to(torch.uint8)
    return Dataset(
        out["train"],
        out["valid"],
        out.get("test"),
        _image_shape(out["train"].shape[1]),
        dynamic=(mode == "dynamic"),
        levels=_levels(spec.pixels, reader.levels, out),
        pixels=spec.pixels,
        train_rows=None if train_rows is None else torch.from_numpy(train_rows),
        **tags,
    )


def _check_pixels(
    array: np.ndarray, where: str, pixels: str, mode: str | None, levels: int | None
) -> np.ndarray:
    """``(N, P)`` pixels of the view ``pixels`` (float32; uint8 for stored binary integers
    taken as they are), or a DataError naming the rule."""
    array = _check_shape(array, where)
    if pixels == "binary" and mode is None and levels in (None, 1) and array.dtype.kind in "biu":
        low, high = int(array.min()), int(array.max())  # integers: {0, 1} iff in [0, 1]
        if low < 0 or high > 1:
            raise DataError(
                f"{where}: values must be in {{0, 1}} (found range [{low}, {high}]); "
                "for intensities in [0, 1] pass --binarize static|dynamic|threshold"
            )
        return array.astype(np.uint8, copy=False)  # no float copy of stored binary images
    if pixels == "binary":
        if levels is not None and levels > 1:
            array = array.astype(np.float32) / np.float32(levels)
        return _check_binary(array.astype(np.float32), where, mode)
    if pixels == "count" or levels is not None:
        counts = _check_counts(array, where, levels)
        return counts if pixels == "count" else counts / np.float32(levels)
    array = _check_finite(array.astype(np.float32), where)
    low, high = float(array.min()), float(array.max())
    if pixels == "unit-interval" and (low < 0.0 or high > 1.0):
        raise DataError(
            f"{where}: unit-interval pixels must be in [0, 1] (found range [{low:g}, {high:g}])"
        )
    return array


def _check_shape(array: np.ndarray, where: str) -> np.ndarray:
    """A numeric, non-empty array of shape ``(N, P)`` (``(N, H, W)`` is flattened)."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = getattr(getattr(array, "dtype", None), "name", type(array).__name__)
        raise DataError(f"{where}: expected a numeric array, got {kind}")
    if array.ndim == 3:
        array = array.reshape(array.shape[0], array.shape[1] * array.shape[2])
    if array.ndim != 2:
        raise DataError(f"{where}: expected shape (N, P) or (N, H, W), got {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{where}: empty dataset, shape {tuple(array.shape)}")
    return array


def _check_finite(array: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise DataError(f"{where}: contains NaN or inf pixels")
    return array


def _check_binary(array: np.ndarray, where: str, mode: str | None) -> np.ndarray:
    """Finite, in {0, 1} (or in [0, 1] when a binarize mode will make it binary)."""
    _check_finite(array, where)
    low, high = float(array.min()), float(array.max())
    if mode is None and not np.isin(array, (0.0, 1.0)).all():
        raise DataError(
            f"{where}: values must be in {{0, 1}} (found range [{low:g}, {high:g}]); "
            "for intensities in [0, 1] pass --binarize static|dynamic|threshold"
        )
    if low < 0.0 or high > 1.0:
        raise DataError(f"{where}: values must be in [0, 1] (found range [{low:g}, {high:g}])")
    return array


def _check_counts(array: np.ndarray, where: str, levels: int | None) -> np.ndarray:
    """Integers in 0..levels (0..2**24 when levels is None) as float32."""
    values = _check_finite(array.astype(np.float64), where)
    fractional = values[values != np.round(values)]
    if fractional.size or values.min() < 0:
        found = fractional.flat[0] if fractional.size else values.min()
        raise DataError(f"{where}: count pixels must be non-negative integers (found {found:g})")
    top = _MAX_COUNT if levels is None else levels
    if values.max() > top:
        raise DataError(f"{where}: count pixels must be at most {top} (found {values.max():g})")
    return values.astype(np.float32)


def _check_labels(
    raw: dict[str, np.ndarray], arrays: dict[str, np.ndarray], source: str
) -> dict[str, np.ndarray]:
    """int64 labels ``(N,)`` per split from the reader's ``<split>_labels`` arrays."""
    labels = {}
    for key in (key for key in raw if key.endswith("_labels")):
        name, where = key.removesuffix("_labels"), f"{source} [{key}]"
        if name not in arrays:
            raise DataError(f"{where}: labels for a split {name!r} that holds no images")
        labels[name] = _check_label_array(raw[key], arrays[name].shape[0], where)
    return labels


def _check_label_array(labels: np.ndarray, num_images: int, where: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "biuf":
        kind = getattr(getattr(labels, "dtype", None), "name", type(labels).__name__)
        raise DataError(f"{where}: expected integer labels, got {kind}")
    if labels.shape != (num_images,):
        raise DataError(
            f"{where}: expected {num_images} labels of shape ({num_images},), "
            f"got shape {tuple(labels.shape)}"
        )
    values = labels.astype(np.float64)
    bad = values[~np.isfinite(values) | (values != np.round(values)) | (values < 0)]
    if bad.size:
        raise DataError(f"{where}: labels must be non-negative integers (found {bad[0]:g})")
    return labels.astype(np.int64)


def _make_splits(
    arrays: dict[str, np.ndarray], labels: dict[str, np.ndarray], source: str, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
    """Split one ``all`` array 80/10/10 and hold out validation data; labels follow.

    Returns the splits, their labels and the training rows of a memory-mapped ``all``
    array (whose ``train`` is then the whole map, read lazily), else None.
    """
    train_rows = None
    if "all" in arrays:
        index = _split(arrays["all"].shape[0], source, seed)
        images, tags = arrays["all"], labels.get("all")
        arrays = {name: images[i] for name, i in index.items() if name != "train"}
        if isinstance(images, np.memmap) and images.dtype == np.uint8:
            arrays["train"], train_rows = images, index["train"]
        else:
            arrays["train"] = images[index["train"]]
        arrays = {name: arrays[name] for name in index}  # the order of the static draws
        labels = {} if tags is None else {name: tags[i] for name, i in index.items()}
    if "valid" not in arrays:
        valid, train = _hold_out(arrays["train"].shape[0], source, seed)
        arrays["valid"], arrays["train"] = arrays["train"][valid], arrays["train"][train]
        if "train" in labels:
            labels["valid"], labels["train"] = labels["train"][valid], labels["train"][train]
    return arrays, labels, train_rows


def _split(num_images: int, source: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded 80/10/10 split of one array: the indices of test, valid and train."""
    n = num_images
    if n < 3:
        raise DataError(f"{source}: {n} images are too few to split into train/valid/test")
    order = np.random.default_rng(seed).permutation(n)
    num_valid = num_test = max(1, n // 10)
    return {
        "test": order[:num_test],
        "valid": order[num_test : num_test + num_valid],
        "train": order[num_test + num_valid :],
    }


def _hold_out(num_train: int, source: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 10% of train as validation data when the file has none: (valid, train) indices."""
    if num_train < 2:
        raise DataError(f"{source}: {num_train} training images are too few to validate on")
    order = np.random.default_rng(seed).permutation(num_train)
    num_valid = max(1, num_train // 10)
    return order[:num_valid], order[num_valid:]


def _binarize(x: Tensor, mode: str | None, generator: torch.Generator, keep: bool) -> Tensor:
    if mode is None or keep:
        return x
    if mode == "threshold":
        return (x >= 0.5).float()
    return torch.bernoulli(x, generator=generator)


def _levels(pixels: str, levels: int | None, splits: dict[str, Tensor]) -> int | None:
    """The view's number of trials: 1 for binary, the source's L (else the largest count)."""
    if pixels == "binary":
        return 1
    if pixels != "count":
        return None
    if levels is not None:
        return levels
    return max(1, max(int(x.max()) for x in splits.values()))


def _image_shape(num_pixels: int) -> tuple[int, int]:
    side = math.isqrt(num_pixels)
    return (side, side) if side * side == num_pixels else (1, num_pixels)
