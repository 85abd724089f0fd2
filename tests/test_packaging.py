"""The built wheel ships every module of the package; a missing subpackage breaks installs."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a fresh copy, so no earlier build/ folder can fill gaps
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "pyro_vae", source / "pyro_vae", ignore=shutil.ignore_patterns("__pycache__")
    )
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pyro_vae").rglob("*.py")}
    assert sources - shipped == set()
