"""Scaling out with torchrun (gloo, CPU): two nodes on localhost, resume under torchrun at the
same and another world size, and elastic restarts after a worker is killed."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from robust_helpers import without_seconds

from pyro_vae.checkpoint import read_payload
from pyro_vae.cli import main
from pyro_vae.resume import LAST

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _data(folder: Path, num_images: int = 400) -> Path:
    rng = np.random.default_rng(0)
    np.save(folder / "tiny.npy", (rng.random((num_images, 16)) < 0.3).astype(np.float32))
    return folder / "tiny.npy"


def _train_args(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        "-m", "pyro_vae", "train", "--data", str(data), "--guide", "diagonal",
        "--latent-dim", "2", "--hidden-dims", "8", "--epochs", str(epochs),
        "--batch-size", "20", "--seed", "3", "--out", str(out), "--quiet",
    ]  # fmt: skip


def _standalone(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    command = _torchrun("--standalone", "--nproc_per_node", str(nproc), *args)
    return subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _two_nodes(args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on localhost."""
    endpoint = f"localhost:{_free_port()}"
    agents = [
        subprocess.Popen(
            _torchrun(
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "two-nodes",
                *args,
            ),  # fmt: skip
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    return done


# ---------------------------------------------------------------- two nodes


def test_two_nodes_keep_identical_parameters_equal_to_one_process(tmp_path: Path) -> None:
    """The data-parallel checks of ddp_worker.py with the ranks on two torchrun agents."""
    results = tmp_path / "results.json"
    done = _two_nodes([str(WORKER), str(results)], tmp_path)
    assert all(d.returncode == 0 for d in done), done[0].stderr[-2000:] + done[1].stderr[-2000:]
    found = json.loads(results.read_text())
    assert found["world_size"] == 2 and found["init_differed"] and found["params_identical"]
    result, reference = found["global"], found["reference_loss_per_datapoint"]
    assert result["synced_identical_on_ranks"] and result["synced_equals_mean_of_own"]
    assert abs(result["loss_per_datapoint"] - reference) < 1e-12 * abs(reference)
    assert result["max_grad_difference_to_reference"] < 1e-12 * result["max_abs_reference_grad"]


def test_two_nodes_train_from_the_cli_and_rank_zero_writes_once(tmp_path: Path) -> None:
    data, out = _data(tmp_path), tmp_path / "run"
    done = _two_nodes(_train_args(data, out, 2), tmp_path)
    assert all(d.returncode == 0 for d in done), done[0].stderr[-2000:] + done[1].stderr[-2000:]
    assert sum(d.stdout.count("best valid ELBO") for d in done) == 1
    assert [row["epoch"] for row in _rows(out)] == ["1", "2"]
    record = json.loads((out / "config.json").read_text())
    assert record["launch"]["world_size"] == 2
    assert "and 1 more processes" in "".join(d.stderr for d in done)


# ---------------------------------------------------------------- resume


def test_resume_under_torchrun_is_bit_identical_at_the_same_world_size(tmp_path: Path) -> None:
    data = _data(tmp_path)
    straight, part = tmp_path / "straight", tmp_path / "part"
    for out, epochs in ((straight, 4), (part, 2)):
        done = _standalone(_train_args(data, out, epochs), tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    stored = read_payload(part / LAST)
    assert len(stored["rng_by_rank"]) == 2  # each rank's streams
    assert not torch.equal(stored["rng_by_rank"][0]["torch"], stored["rng_by_rank"][1]["torch"])
    resume = ["-m", "pyro_vae", "train", "--resume", str(part), "--epochs", "4", "--quiet"]
    done = _standalone(resume, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, reference = read_payload(part / LAST), read_payload(straight / LAST)
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert without_seconds(resumed["history"]) == without_seconds(reference["history"])
    assert len(_rows(part)) == 4


def test_resume_with_another_number_of_processes_continues(tmp_path: Path) -> None:
    """2 processes, then 1: same weights, optimizer, epoch and minibatch order; new shards."""
    data, run = _data(tmp_path), tmp_path / "run"
    done = _standalone(_train_args(data, run, 2), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    before = read_payload(run / LAST)["history"]
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    after = read_payload(run / LAST)
    assert after["epoch"] == 3 and without_seconds(after["history"][:2]) == without_seconds(before)
    assert "rng_by_rank" not in after  # one process now
    assert [row["epoch"] for row in _rows(run)] == ["1", "2", "3"]


# ---------------------------------------------------------------- elastic restarts


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_killed_worker_restarts_from_the_last_completed_epoch(tmp_path: Path) -> None:
    data, run = _data(tmp_path, num_images=2000), tmp_path / "run"
    epochs = 8
    command = _torchrun(
        "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
        *_train_args(data, run, epochs),
    )  # fmt: skip
    agent = subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists() or len(_rows(run)) < 2:
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        seen = len(_rows(run))
        workers = _children(agent.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)  # one worker dies mid-run
        out, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err[-3000:]
    restarted = re.findall(r"restarted: continuing .* \(epoch (\d+)\)", err)
    assert len(restarted) == 1, err[-3000:]
    assert int(restarted[0]) >= seen - 1  # at most the epoch in progress was lost
    assert [row["epoch"] for row in _rows(run)] == [str(e) for e in range(1, epochs + 1)]
    assert read_payload(run / LAST)["epoch"] == epochs
    assert out.count("best valid ELBO") == 1
