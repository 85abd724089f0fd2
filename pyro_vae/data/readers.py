"""The registered data sources, one reader class each: what they hold and how to read it."""

from __future__ import annotations

import gzip
import math
import struct
import warnings
from pathlib import Path

import numpy as np

from .base import SPLITS, DataError, DatasetReader, example_images, register_dataset

__all__ = ["ArrayReader", "BinarizedMnistReader", "DigitsReader", "MnistReader"]

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801


@register_dataset("digits")
class DigitsReader(DatasetReader):
    """scikit-learn's 1,797 handwritten digits: 8x8 pixels with intensities 0..16, labels 0..9.

    A seeded split: 300 test, 200 validation and 1,297 training images.
    """

    needs_path = False
    levels = 16
    default_binarize = "threshold"
    has_labels = True

    @classmethod
    def read(cls, path: Path | None, seed: int) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.data.astype(np.uint8), digits.target.astype(np.int64)
        order = np.random.default_rng(seed).permutation(len(images))
        index = {"train": order[500:], "valid": order[300:500], "test": order[:300]}
        return {
            **{name: images[i] for name, i in index.items()},
            **{f"{name}_labels": labels[i] for name, i in index.items()},
        }

    @classmethod
    def write_example(cls, folder: Path) -> str | None:
        return None


@register_dataset("binarized-mnist")
class BinarizedMnistReader(DatasetReader):
    """Fixed binarized MNIST: an ``.npz`` with train/valid[/test] arrays, or the Larochelle &
    Murray files ``binarized_mnist_{train,valid,test}.amat`` in a folder. No labels."""

    levels = 1

    @classmethod
    def read(cls, path: Path | None, seed: int) -> dict[str, np.ndarray]:
        assert path is not None
        if path.suffix == ".npz":
            splits = _read_npz(path)
            if "train" not in splits or "valid" not in splits:
                raise DataError(
                    f"{path}: expected arrays 'train' and 'valid', "
                    f"found {sorted(splits) or 'none'}"
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

    @classmethod
    def write_example(cls, folder: Path) -> str | None:
        images, _ = example_images()
        path = folder / "binarized_mnist.npz"
        np.savez(path, train=images[:20], valid=images[20:25], test=images[25:])
        return str(path)


@register_dataset("mnist")
class MnistReader(DatasetReader):
    """MNIST's IDX files in a folder (optionally gzipped), intensities 0..255.

    The first 50,000 training images train and the rest validate (90% / 10% when there are
    fewer); ``t10k-images-idx3-ubyte`` is the test split. Labels come from
    ``train-labels-idx1-ubyte`` and ``t10k-labels-idx1-ubyte`` when present.
    """

    levels = 255
    default_binarize = "dynamic"
    has_labels = True

    @classmethod
    def read(cls, path: Path | None, seed: int) -> dict[str, np.ndarray]:
        assert path is not None
        if not path.is_dir():
            raise DataError(f"{path}: expected a folder holding train-images-idx3-ubyte[.gz]")
        train = _read_idx(_find_idx(path, "train-images-idx3-ubyte"), _IDX_IMAGES)
        num_train = 50000 if len(train) > 50000 else max(1, int(round(0.9 * len(train))))
        splits = {"train": train[:num_train], "valid": train[num_train:]}
        if len(splits["valid"]) == 0:
            raise DataError(
                f"{path}: too few training images ({len(train)}) to hold out a validation split"
            )
        labels = _idx_labels(path, "train", len(train))
        if labels is not None:
            splits["train_labels"], splits["valid_labels"] = labels[:num_train], labels[num_train:]
        test_file = _find_idx(path, "t10k-images-idx3-ubyte", required=False)
        if test_file is not None:
            splits["test"] = _read_idx(test_file, _IDX_IMAGES)
            labels = _idx_labels(path, "t10k", len(splits["test"]))
            if labels is not None:
                splits["test_labels"] = labels
        return splits

    @classmethod
    def write_example(cls, folder: Path) -> str | None:
        images, labels = example_images()
        images = images.reshape(-1, 4, 4) * np.uint8(255)
        out = folder / "mnist"
        out.mkdir()
        for prefix, part in (("train", slice(0, 24)), ("t10k", slice(24, None))):
            _write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[part], _IDX_IMAGES)
            _write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[part], _IDX_LABELS)
        return str(out)


@register_dataset("array")
class ArrayReader(DatasetReader):
    """Your own arrays, values as stored: an ``.npy`` array (split 80/10/10), or an ``.npz``
    holding one array (plus optional ``labels``) or ``train``/``valid``/``test`` (plus optional
    ``train_labels``/``valid_labels``/``test_labels``); without ``valid`` 10% of train validate.
    """

    has_labels = True

    @classmethod
    def read(cls, path: Path | None, seed: int) -> dict[str, np.ndarray]:
        assert path is not None
        if path.suffix == ".npy":
            try:
                with open(path, "rb") as handle:
                    magic = handle.read(6)
            except OSError as error:
                raise DataError(f"{path}: cannot read as .npy ({error.strerror})") from None
            if magic != b"\x93NUMPY":
                raise DataError(
                    f"{path}: not a .npy file (it does not start with NumPy's header); save "
                    "arrays with numpy.save"
                )
            try:
                return {"all": np.load(path, mmap_mode="r", allow_pickle=False)}
            except (OSError, ValueError, EOFError) as error:
                raise DataError(f"{path}: cannot read as .npy ({error})") from None
        if path.suffix != ".npz":
            raise DataError(f"{path}: expected a .npy or .npz file")
        arrays = _read_npz(path)
        if "train" in arrays:
            known = [*SPLITS, *(f"{name}_labels" for name in SPLITS)]
            return {key: arrays[key] for key in known if key in arrays}
        images = [key for key in arrays if key != "labels"]
        if len(images) != 1:
            raise DataError(
                f"{path}: expected one array or 'train'/'valid'/'test', found {sorted(arrays)}"
            )
        out = {"all": arrays[images[0]]}
        if "labels" in arrays:
            out["all_labels"] = arrays["labels"]
        return out

    @classmethod
    def write_example(cls, folder: Path) -> str | None:
        images, labels = example_images()
        path = folder / "array.npz"
        np.savez(path, images=images, labels=labels)
        return str(path)


# ---------------------------------------------------------------- file formats


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read as .npz ({error})") from None


def _read_amat(file: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # an empty file is reported as an empty dataset
            warnings.filterwarnings("ignore", "loadtxt: input contained no data", UserWarning)
            return np.loadtxt(file, dtype=np.float32, ndmin=2)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{file}: not a whitespace-separated table of pixels ({error})") from None


def _find_idx(folder: Path, stem: str, required: bool = True) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx")):
        if candidate.exists():
            return candidate
    if required:
        raise DataError(f"{folder}: no {stem} or {stem}.gz")
    return None


def _idx_labels(folder: Path, prefix: str, num_images: int) -> np.ndarray | None:
    """The labels beside ``{prefix}-images``, None when there is no labels file."""
    file = _find_idx(folder, f"{prefix}-labels-idx1-ubyte", required=False)
    if file is None:
        return None
    labels = _read_idx(file, _IDX_LABELS)
    if len(labels) != num_images:
        raise DataError(f"{file}: {len(labels)} labels for {num_images} images")
    return labels.astype(np.int64)


def _read_idx(file: Path, magic: int) -> np.ndarray:
    """uint8 images ``(N, H * W)`` (magic 0x803) or labels ``(N,)`` (magic 0x801)."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{file}: cannot read ({error})") from None
    kind = "image" if magic == _IDX_IMAGES else "label"
    num_dims = magic & 0xFF
    start = 4 + 4 * num_dims
    if len(raw) < start or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{file}: not an IDX {kind} file (bad magic number)")
    shape = struct.unpack(f">{num_dims}I", raw[4:start])
    expected = start + math.prod(shape)
    if len(raw) != expected:
        raise DataError(f"{file}: truncated or padded: {len(raw)} bytes, header says {expected}")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=start)
    return pixels.reshape(shape[0], math.prod(shape[1:])) if num_dims > 1 else pixels


def _write_idx(file: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    file.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
