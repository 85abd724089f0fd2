"""Shared fixtures: a clean Pyro state, seeded RNGs and validation for every test."""

from __future__ import annotations

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def clean_pyro_state() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_num_threads(2)


@pytest.fixture
def float64() -> None:
    """Run a numerical test in double precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
