"""scripts/device_check.sh: its syntax, its flags, and a clear stop without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def test_the_script_parses_as_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_every_flag_it_passes_exists() -> None:
    text = SCRIPT.read_text()
    speed = subprocess.run(
        ["python", str(SCRIPT.parent / "benchmark_speed.py"), "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for flag in ("--devices", "--batch-size", "--guides", "--variants", "--repeats"):
        assert flag in text and flag in speed, flag
    variants = re.search(r"--variants ([a-z ]+)", text).group(1).split()
    choices = re.search(r"--variants \{([a-z,-]+)\}", speed).group(1).split(",")
    assert set(variants) <= set(choices) and "default" in variants and "eager" in variants
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    known = {
        name: {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
        for name, parser in commands.items()
    }
    for flag in re.findall(r"(--[a-z_-]+)", text.split("common=(")[1].split("rm -rf")[0]):
        if flag in ("--standalone", "--nproc_per_node", "--split", "--num-points", "--json"):
            continue
        assert flag in known["train"] or flag in known["evaluate"], flag
    assert {"--split", "--num-points", "--num-samples", "--json"} <= known["evaluate"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 3
    assert done.stderr.strip() == (
        "device_check: no CUDA GPU is visible to torch; nothing was measured"
    )
    assert list((tmp_path / "out").iterdir()) == []  # nothing measured, nothing written
