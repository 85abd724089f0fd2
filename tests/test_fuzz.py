"""Property-based: malformed arrays, files and argv never give a traceback or a hang."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from robust_helpers import save_binary_npy

from pyro_vae.cli import main
from pyro_vae.data import BINARIZE_MODES, DataError, DataSpec, load_dataset

FUZZ = settings(
    max_examples=int(os.environ.get("PYRO_VAE_FUZZ_EXAMPLES", 40)),
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow],
)

NUMERIC = st.sampled_from(
    ["bool", "int8", "uint8", "int32", "int64", "float16", "float32", "float64", "complex64"]
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
VALUES = st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0, 255.0, np.nan, np.inf, -np.inf])


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Numeric arrays of any rank with binary, fractional, negative, huge and NaN/inf values,
    or arrays of strings and of Python objects."""
    kind = draw(st.sampled_from(["numeric", "numeric", "numeric", "strings", "objects"]))
    shape = draw(SHAPES)
    if kind == "strings":
        return np.full(shape, draw(st.text(max_size=3)))
    if kind == "objects":
        return np.array([draw(st.lists(st.none() | st.integers(), max_size=3))], dtype=object)
    dtype = np.dtype(draw(NUMERIC))
    values = draw(hnp.arrays(np.float64, shape, elements=VALUES))
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(dtype)


def check_dataset(data: object, mode: str | None) -> None:
    """What a loader may return: finite images in {0, 1} ([0, 1] for dynamic train)."""
    for name in ("train", "valid"):
        x = getattr(data, name)
        assert x.dim() == 2 and x.shape[0] >= 1 and x.shape[1] >= 1
        assert bool(torch.isfinite(x).all())
        if name == "train" and mode == "dynamic":
            assert bool(((x >= 0) & (x <= 1)).all())
        else:
            assert bool(((x == 0) | (x == 1)).all())


@FUZZ
@given(
    array=arrays(),
    mode=st.sampled_from([None, *BINARIZE_MODES]),
    container=st.sampled_from(["npy", "npz-one", "npz-splits"]),
)
def test_array_loader_raises_only_data_errors(
    array: np.ndarray, mode: str | None, container: str
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("x.npy" if container == "npy" else "x.npz")
        if container == "npy":
            np.save(path, array, allow_pickle=True)
        elif container == "npz-one":
            np.savez(path, images=array)
        else:
            np.savez(path, train=array, valid=array[:1] if array.ndim else array)
        try:
            data = load_dataset(DataSpec("array", str(path), mode))
        except DataError as error:
            assert "\n" not in str(error) and str(path) in str(error)
            return
        check_dataset(data, mode)


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".npy", ".npz", ".amat"]))
def test_random_bytes_are_data_errors(content: bytes, suffix: str) -> None:
    name = "binarized-mnist" if suffix == ".amat" else "array"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"binarized_mnist_train{suffix}"
        path.write_bytes(content)
        if suffix == ".amat":
            (Path(folder) / "binarized_mnist_valid.amat").write_bytes(content)
        try:
            data = load_dataset(DataSpec(name, str(path)))
        except DataError as error:
            assert "\n" not in str(error)
            return
        check_dataset(data, None)


SMALL_INT = st.integers(-2, 3).map(str)
WORD = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6).filter(
    lambda s: not s.startswith(("-h", "--h", "--v"))  # help and version exit on purpose
)
NUMBER = st.sampled_from(["0", "-1", "1e-3", "nan", "inf", "-0.0", "1e308", "0.5", "abc", ""])
OPTIONS = st.one_of(
    st.tuples(st.just("--epochs"), SMALL_INT),
    st.tuples(st.just("--batch-size"), SMALL_INT | st.just("100000")),
    st.tuples(st.just("--latent-dim"), SMALL_INT | st.just("99999")),
    st.tuples(st.just("--hidden-dims"), st.sampled_from(["2", "2,3", "0", "2,,3", "x", ""])),
    st.tuples(st.just("--num-particles"), SMALL_INT),
    st.tuples(st.just("--lr"), NUMBER),
    st.tuples(st.just("--clip-norm"), NUMBER),
    st.tuples(st.just("--seed"), SMALL_INT | WORD),
    st.tuples(st.just("--guide"), st.sampled_from(["diagonal", "full", "iaf", ""]) | WORD),
    st.tuples(st.just("--guide-option"), st.sampled_from(["tril_scale=0.1", "x=1", "=", "a"])),
    st.tuples(st.just("--binarize"), st.sampled_from(["static", "dynamic", "none", ""])),
    st.tuples(st.just("--device"), st.sampled_from(["cpu", "cuda:7", "meta", "auto", ""])),
    st.tuples(st.just("--data"), st.sampled_from(["good.npy", "half.npy", "bad.npy", "gone.npy"])),
    st.tuples(st.just("--data"), st.sampled_from(["mnist", "binarized-mnist", "array", "x"])),
    st.tuples(st.just("--resume"), st.sampled_from(["run", "good.npy", "gone", "."])),
    st.tuples(st.just("--out"), st.sampled_from(["run", "good.npy", "new"])),
    st.tuples(st.just("--overwrite")),
    st.tuples(WORD),
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with data files and one finished run, copied for every example."""
    folder = tmp_path_factory.mktemp("cli")
    with contextlib.chdir(folder):
        save_binary_npy(Path("good.npy"), num_images=20, pixels=4)
        np.save("half.npy", np.full((20, 4), 0.5))
        Path("bad.npy").write_bytes(b"\x93NUMPY garbage")
        assert main(["train", "--data", "good.npy", "--epochs", "1", "--latent-dim", "1",
                     "--hidden-dims", "2", "--batch-size", "8", "--guide", "diagonal",
                     "--out", "run", "--quiet"]) == 0  # fmt: skip
    return folder


@settings(FUZZ, max_examples=int(os.environ.get("PYRO_VAE_FUZZ_EXAMPLES", 30)))
@given(
    command=st.sampled_from(["train", "train", "train", "evaluate", "sample", ""]),
    options=st.lists(OPTIONS, max_size=5),
)
def test_cli_never_shows_a_traceback(
    template: Path, command: str, options: list[tuple[str, ...]]
) -> None:
    argv = [command] if command else []
    if command == "train":
        argv += ["--data", "good.npy", "--epochs", "1", "--latent-dim", "2", "--hidden-dims", "4"]
        argv += ["--batch-size", "8", "--guide", "diagonal", "--out", "new", "--quiet"]
    elif command in ("evaluate", "sample"):
        argv += ["run"]
    argv += [word for option in options for word in option]
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        shutil.copytree(template, folder, dirs_exist_ok=True)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main(argv)
        lines = err.getvalue().strip().splitlines()
        if status == 2:  # bad input: rejected before anything ran
            assert len(lines) == 1 and lines[0].startswith("pyro-vae: error: "), lines
        elif status == 1:  # e.g. --lr 1e308 diverges; reported in one line
            assert lines[-1].startswith("pyro-vae: error: training diverged"), lines
        else:
            assert status == 0, (status, lines)
            assert "Traceback" not in err.getvalue()


def test_folder_named_like_an_array_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.mkdir()
    with pytest.raises(DataError, match="x.npy"):
        load_dataset(DataSpec("array", str(path)))
