"""Contract over DATASETS: each reader's example loads under every pixel view it supports, with
splits that partition the source, values in the view's support, and labels on their images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.data import DATASETS, SPLITS, Dataset, DataSpec, load_dataset
from pyro_vae.data.base import example_images

CASES = [(key, pixels) for key in sorted(DATASETS) for pixels in DATASETS[key].pixel_kinds]
#: Sources whose example file encodes each image's index (built-in digits writes none).
FILE_CASES = [(key, pixels) for key, pixels in CASES if DATASETS[key].needs_path]


def _load(key: str, path: str | None, **options: object) -> Dataset:
    return load_dataset(DataSpec(key, path, **options))


def _present(data: Dataset) -> list[str]:
    return [name for name in SPLITS if getattr(data, name) is not None]


def _check_support(x: torch.Tensor, pixels: str, levels: int | None) -> None:
    assert bool(x.isfinite().all())
    if pixels == "binary":
        assert bool(((x == 0) | (x == 1)).all()) and levels == 1
    elif pixels == "unit-interval":
        assert bool(((x >= 0) & (x <= 1)).all())
    elif pixels == "count":
        assert isinstance(levels, int) and levels >= 1
        assert bool(((x >= 0) & (x <= levels) & (x == x.round())).all())


@pytest.mark.parametrize(("key", "pixels"), CASES)
def test_dataset_contract(tmp_path: Path, key: str, pixels: str) -> None:
    reader = DATASETS[key]
    path = reader.write_example(tmp_path)
    assert (path is None) == (not reader.needs_path)
    data = _load(key, path, pixels=pixels)
    assert data.pixels == pixels and math.prod(data.image_shape) == data.data_dim
    if pixels == "count" and reader.levels is not None:
        assert data.levels == reader.levels
    for name in _present(data):
        x, labels = getattr(data, name), data.labels(name)
        compact = pixels in ("binary", "count") and not (data.dynamic and name == "train")
        assert x.dtype == (torch.uint8 if compact else torch.float32), (name, x.dtype)
        assert x.dim() == 2 and x.shape[0] >= 1 and x.shape[1] == data.data_dim
        read = data.split(name)
        assert read.dtype == torch.float32 and read.shape == x.shape
        if not (data.dynamic and name == "train"):  # the same values, as floats
            assert torch.equal(read, x.float())
            index = torch.arange(min(3, x.shape[0]))
            if name == "train":
                assert torch.equal(data.train_batch(index), read[index])
        _check_support(data.split(name), pixels, data.levels)
        if data.dynamic:  # the stored training intensities are drawn per batch
            assert pixels == "binary" and bool(((data.train >= 0) & (data.train <= 1)).all())
        else:
            _check_support(x, pixels, data.levels)
        if reader.has_labels:
            assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
        else:
            assert labels is None
    moved = data.to("cpu")
    assert all(
        torch.equal(moved.labels(n), data.labels(n)) for n in SPLITS if data.labels(n) is not None
    )


@pytest.mark.parametrize(("key", "pixels"), FILE_CASES)
def test_example_splits_partition_the_images_and_labels_follow(
    tmp_path: Path, key: str, pixels: str
) -> None:
    """Each example image encodes its index and label, so both can be read back."""
    reader = DATASETS[key]
    path = reader.write_example(tmp_path)
    data = _load(key, path, pixels=pixels)
    images, labels = example_images()
    rows = torch.cat([getattr(data, name) for name in _present(data)]) > 0
    index = (rows[:, 3:].long() << torch.arange(13)).sum(1)
    assert sorted(index.tolist()) == list(range(len(images)))  # disjoint, and cover the source
    assert torch.equal(rows.to(torch.uint8), torch.from_numpy(images)[index])
    if reader.has_labels:
        stored = torch.cat([data.labels(name) for name in _present(data)])
        assert torch.equal(stored, torch.from_numpy(labels)[index])
        assert torch.equal(stored, rows[:, :3].long().argmax(1)) and data.num_classes == 3


@pytest.mark.parametrize("key", sorted(DATASETS))
def test_splits_and_labels_do_not_depend_on_the_seed(tmp_path: Path, key: str) -> None:
    """Whatever the seed, the splits hold the same (image, label) pairs."""
    reader = DATASETS[key]
    path = reader.write_example(tmp_path)
    pixels = "count" if "count" in reader.pixel_kinds else reader.pixel_kinds[0]
    pairs = []
    for seed in (0, 1):
        data = _load(key, path, pixels=pixels, seed=seed)
        rows = torch.cat([data.split(name) for name in _present(data)]).tolist()
        tags = [data.labels(name) for name in _present(data)]
        labels = [None] * len(rows) if tags[0] is None else torch.cat(tags).tolist()
        pairs.append(sorted(zip(map(tuple, rows), labels, strict=True), key=repr))
    assert pairs[0] == pairs[1]


@pytest.mark.parametrize("key", sorted(DATASETS))
def test_pixel_views_of_one_source_agree(tmp_path: Path, key: str) -> None:
    """unit-interval = count / L = real, threshold binarization = (unit-interval >= 0.5)."""
    reader = DATASETS[key]
    kinds = set(reader.pixel_kinds)
    path = reader.write_example(tmp_path)
    views = {pixels: _load(key, path, pixels=pixels) for pixels in kinds}
    if "binary" in kinds:
        views["threshold"] = _load(key, path, binarize="threshold")
    scale = float(reader.levels or 1)  # the examples hold 0 and L only
    for name in _present(views[reader.pixel_kinds[0]]):
        x = {pixels: data.split(name) for pixels, data in views.items()}
        if {"count", "unit-interval"} <= kinds:
            assert torch.equal(x["unit-interval"], x["count"] / scale)
        if {"real", "unit-interval"} <= kinds:
            assert torch.equal(x["real"], x["unit-interval"])
        if {"binary", "unit-interval"} <= kinds:
            assert torch.equal(x["threshold"], (x["unit-interval"] >= 0.5).float())
        labels = [data.labels(name) for data in views.values()]
        assert all(t is None for t in labels) or all(torch.equal(t, labels[0]) for t in labels)


def test_example_images_are_distinct_and_carry_their_labels() -> None:
    images, labels = example_images()
    assert images.dtype == np.uint8 and images.shape == (30, 16)
    assert len({row.tobytes() for row in images}) == 30
    assert np.array_equal(images[:, :3].argmax(1), labels)
