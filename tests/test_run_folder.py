"""One writer per run folder, --overwrite that keeps the old run until an epoch completes, I/O
errors while recording an epoch, and refused resumes that change no file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from robust_helpers import cli_train, save_binary_npy, without_seconds

from pyro_vae.checkpoint import read_payload
from pyro_vae.cli import main
from pyro_vae.resume import LAST
from pyro_vae.run_folder import LOCK, PREVIOUS, RunFolder, RunFolderBusy
from pyro_vae.runs import run_folder

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(run: Path, pid: int, host: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path]:
    """A finished 1-epoch run and its data."""
    data = save_binary_npy(tmp_path / "d.npy")
    run = tmp_path / "run"
    assert main(cli_train(data, run, 1)) == 0
    assert not (run / LOCK).exists()  # released
    return data, run


# ---------------------------------------------------------------- the lock


def test_a_live_writer_refuses_every_training_into_its_folder(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run, sleeper.pid)
        before = _snapshot(run)
        capsys.readouterr()
        attempts = [
            cli_train(data, run, 1, "--overwrite"),
            ["train", "--resume", str(run), "--epochs", "2"],
        ]
        for argv in attempts:
            assert main(argv) == 2
            line = _error_line(capsys)
            assert f"is being written by process {sleeper.pid}" in line and str(run / LOCK) in line
            assert _snapshot(run) == before  # nothing written, the lock untouched
        assert main(["evaluate", str(run), "--num-samples", "2", "--quiet"]) == 0  # readers read
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_from_another_host_is_refused_and_a_garbled_one_too(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    _write_lock(run, os.getpid(), host="another-machine.invalid")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    line = _error_line(capsys)
    assert f"process {os.getpid()} on another-machine.invalid" in line
    (run / LOCK).write_text("not json")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "an unknown process" in _error_line(capsys)


def test_a_stale_lock_of_an_ended_process_is_taken_over_and_reported(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    pid = _dead_pid()
    _write_lock(run, pid)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert f"was left by process {pid}, which has ended" in err
    assert read_payload(run / LAST)["epoch"] == 2 and not (run / LOCK).exists()


def test_two_concurrent_trainings_into_one_folder_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = save_binary_npy(tmp_path / "d.npy", num_images=400)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pyro_vae", *cli_train(data, run, 1000, "--overwrite")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (run / "config.json").exists():  # written under the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert main(cli_train(data, run, 2, "--overwrite")) == 2
        line = _error_line(capsys)
        assert f"is being written by process {first.pid}" in line
        stored = json.loads((run / "config.json").read_text())
        assert stored["train"]["num_epochs"] == 1000  # the first run's record, untouched
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert not (run / LOCK).exists()  # released on SIGTERM


# ---------------------------------------------------------------- --overwrite


def test_overwrite_that_diverges_keeps_the_old_run_byte_for_byte(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    (run / "notes.txt").write_text("mine")  # not the run's: never moved
    before = _snapshot(run)
    assert main(cli_train(data, run, 2, "--overwrite", "--lr", "1e308")) == 1
    line = _error_line(capsys)
    assert "training diverged at epoch 1" in line and "keeps the run it held before" in line
    assert _snapshot(run) == before
    assert not (run / PREVIOUS).exists() and not (run / LOCK).exists()


def test_overwrite_replaces_the_run_once_an_epoch_completed(trained: tuple[Path, Path]) -> None:
    data, run = trained
    (run / "notes.txt").write_text("mine")
    (run / "samples-7.png").write_bytes(b"old picture")  # an output of `pyro-vae sample`
    assert main(cli_train(data, run, 2, "--overwrite", "--hidden-dims", "6")) == 0
    assert json.loads((run / "config.json").read_text())["model"]["hidden_dims"] == [6]
    assert read_payload(run / LAST)["epoch"] == 2
    assert not (run / PREVIOUS).exists() and not (run / "samples-7.png").exists()
    assert (run / "notes.txt").read_text() == "mine"


def test_an_overwrite_killed_before_its_first_epoch_gives_the_old_run_back(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """What a kill -9 leaves: the old run in .previous, the new run's record, a dead lock."""
    data, run = trained
    before = _snapshot(run)
    folder = run_folder(run).acquire()
    folder.set_aside()
    (run / "config.json").write_text("{}")  # the new run's record, no epoch yet
    _write_lock(run, _dead_pid())
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "the previous run was put back" in capsys.readouterr().err
    assert read_payload(run / LAST)["epoch"] == 2
    assert not (run / PREVIOUS).exists()
    assert json.loads((run / "config.json").read_text()) != {}
    assert set(before) <= set(_snapshot(run))


def test_an_overwrite_killed_after_its_first_epoch_keeps_the_new_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / PREVIOUS).mkdir()
    (run / PREVIOUS / "last.pt").write_bytes(b"old")
    (run / "last.pt").write_bytes(b"new")
    with RunFolder(run):
        assert not (run / PREVIOUS).exists() and (run / "last.pt").read_bytes() == b"new"


def test_set_aside_moves_last_pt_first_and_restore_is_exact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    files = {"config.json": b"c", "last.pt": b"l", "metrics.csv": b"m", "tensorboard/e": b"t"}
    for name, content in files.items():
        (run / name).write_bytes(content)
    moved: list[str] = []
    original = Path.rename

    def rename(self: Path, target: Path) -> Path:
        moved.append(self.name)
        return original(self, target)

    folder = RunFolder(run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", rename)
        folder.set_aside()
    assert moved[0] == "last.pt" and folder.entries() == []
    (run / "config.json").write_bytes(b"new")
    assert folder.restore()
    assert _snapshot(run) == files and not folder.restore()


def test_busy_is_a_value_error_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunFolder(run):
        with pytest.raises(RunFolderBusy) as error:
            RunFolder(run).acquire()
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    assert str(os.getpid()) in str(error.value)


# ---------------------------------------------------------------- resumes that are refused


def test_a_refused_resume_changes_no_file(
    tmp_path: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    other = tmp_path / "other"
    assert main(cli_train(data, other, 1, "--hidden-dims", "5")) == 0
    (run / LAST).write_bytes((other / LAST).read_bytes())  # last.pt of another model
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr", "0.002"]) == 2
    line = _error_line(capsys)
    assert "holds another model: hidden_dims [5] (expected [8])" in line and len(line) < 400
    assert _snapshot(run) == before


def test_a_diverging_resume_does_not_record_its_settings(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    config = (run / "config.json").read_bytes()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr", "1e308"]) == 1
    assert "training diverged at epoch 2" in _error_line(capsys)
    assert (run / "config.json").read_bytes() == config  # lr 1e308 never recorded
    assert read_payload(run / LAST)["epoch"] == 1


# ---------------------------------------------------------------- a full disk


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pyro_vae.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file-size limit")
def test_a_full_disk_leaves_the_last_epoch_and_resume_continues_exactly(
    tmp_path: Path, trained: tuple[Path, Path]
) -> None:
    """A file-size limit below a checkpoint's size stands in for a full file system."""
    data, run = trained
    before = _snapshot(run)
    limit = (run / LAST).stat().st_size // 2  # metrics.csv fits, checkpoints do not
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = ["train", "--resume", str(run), "--epochs", "3"]
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(limit), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert "epoch 2 could not be recorded (cannot write" in lines[-1]
    assert "File too large" in lines[-1] and f"{run} keeps epoch 1" in lines[-1]
    assert f"then: pyro-vae train --resume {run}" in lines[-1]
    after = _snapshot(run)
    for name in ("last.pt", "config.json", "metrics.csv"):
        assert after[name] == before[name], name
    assert not list(run.glob(".*.tmp")) and not (run / LOCK).exists()
    # space again: the resume continues as if nothing had happened
    assert main(argv) == 0
    assert main(cli_train(data, tmp_path / "straight", 3)) == 0
    resumed = read_payload(run / LAST)
    reference = read_payload(tmp_path / "straight" / LAST)
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert without_seconds(resumed["history"]) == without_seconds(reference["history"])
