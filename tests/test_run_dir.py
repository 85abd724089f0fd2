"""The run folder's layout lives in RunDir: every file a run writes is one of its names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from robust_helpers import cli_train, save_binary_npy

from pyro_vae import RunDir
from pyro_vae.cli import main
from pyro_vae.run_dir import RunError, best_index

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"


def test_metrics_and_evaluations_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    history = [{"epoch": 1, "train_elbo": -3.5, "valid_elbo": -4.0, "seconds": 0.1},
               {"epoch": 2, "train_elbo": -2.5, "valid_elbo": -3.0, "seconds": 0.1}]  # fmt: skip
    run.write_metrics(history)
    assert run.read_metrics() == {
        "epoch": [1.0, 2.0], "train_elbo": [-3.5, -2.5], "valid_elbo": [-4.0, -3.0]
    }  # fmt: skip
    bound = [{**row, "valid_bound": row["valid_elbo"] + 1} for row in history]
    run.write_metrics(bound)  # a run trained with the IWAE bound
    assert run.read_metrics()["valid_bound"] == [-3.0, -2.0]
    elbo_best, bound_best = [-3.0, -4.0, -5.0], [-2.0, -1.0, -1.5]
    assert best_index({"valid_elbo": elbo_best}) == 0
    assert best_index({"valid_elbo": elbo_best, "valid_bound": bound_best}) == 1
    run.write_metrics([history[0], bound[1]])  # resumed from before the bound was logged
    assert "valid_bound" not in run.read_metrics()
    run.write_metrics(history)
    run.record_evaluation({"split": "valid", "elbo": -3.0})
    run.record_evaluation({"split": "test", "elbo": -3.2})
    run.record_evaluation({"split": "valid", "elbo": -2.9})  # replaces that split only
    assert run.read_evaluations() == {
        "valid": {"split": "valid", "elbo": -2.9}, "test": {"split": "test", "elbo": -3.2}
    }  # fmt: skip
    run.evaluations.write_text("[not json")
    assert run.read_evaluations() == {}
    assert run.saved_epoch() is None  # no last.pt
    with pytest.raises(RunError, match="not a run folder"):
        run.read_record()
    run.write_record({"model": {}})
    assert run.read_record() == {"model": {}}
    assert set(run.existing()) == {RunDir.CONFIG, RunDir.METRICS, RunDir.EVALUATIONS}


def test_everything_a_run_writes_is_a_named_output(tmp_path: Path) -> None:
    data = save_binary_npy(tmp_path / "d.npy", num_images=60)
    run = RunDir(tmp_path / "run")
    assert main(cli_train(data, run.path, 2, "--tensorboard")) == 0
    assert main(["evaluate", str(run.path), "--num-samples", "5", "--quiet"]) == 0
    gaps = ["--num-points", "4", "--num-steps", "3", "--num-samples", "5", "--quiet"]
    assert main(["gaps", str(run.path), *gaps]) == 0
    assert main(["latent", str(run.path), "--num-points", "20"]) == 0
    (run.path / "notes.txt").write_text("the user's own file")
    written = {p for p in run.path.iterdir() if p.name not in ("notes.txt", ".lock")}
    assert written == set(run.outputs())
    assert run.saved_epoch() == 2
    assert {RunDir.LAST, RunDir.CHECKPOINT, RunDir.CURVES, RunDir.GAPS, RunDir.LATENT} <= set(
        run.existing()
    )


def test_no_other_module_names_a_run_file() -> None:
    """File names of the run folder are spelled in run_dir.py only."""
    names = [n for n in RunDir.FILES if n != RunDir.CONFIG]  # also an exported model's file
    pattern = re.compile("|".join(re.escape(f'"{name}"') for name in names))
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "run_dir.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
