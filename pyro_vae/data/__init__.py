"""Datasets of images: a registry of readers, pixel views, labels, checks and splits; no Pyro."""

from __future__ import annotations

from . import readers  # noqa: F401  (registers every reader in DATASETS)
from .base import (
    BINARIZE_MODES,
    DATASETS,
    PIXEL_KINDS,
    SPLITS,
    DataError,
    Dataset,
    DatasetReader,
    DataSpec,
    load_dataset,
    minibatches,
    register_dataset,
)

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "PIXEL_KINDS",
    "SPLITS",
    "DataError",
    "DataSpec",
    "Dataset",
    "DatasetReader",
    "load_dataset",
    "minibatches",
    "register_dataset",
]
