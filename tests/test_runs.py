"""Runs from a config: train --config reproduces a run, load_run repeats it in Python."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pyro_vae import fit, load_dataset, load_run
from pyro_vae.cli import main
from pyro_vae.runs import RunError, train_options

SMALL = ["--epochs", "2", "--hidden-dims", "16", "--quiet"]
# a run that sets many axes away from their defaults, so a lost setting shows
SETTINGS = [
    "--latent-dims", "3,2", "--guide", "iaf", "--num-flows", "2",
    "--layer-guides", "iaf,diagonal", "--likelihood", "binomial", "--prior", "mixture",
    "--prior-option", "num_components=3", "--kl-warmup", "1", "--lr-schedule", "cosine",
    "--lr", "0.002", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)  # as every test runs (conftest): float sums depend on it
    out = tmp_path_factory.mktemp("runs") / "a"
    assert main(["train", *SMALL, *SETTINGS, "--out", str(out)]) == 0
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"]


def _metrics(run: Path) -> list[tuple[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return [(row["train_elbo"], row["valid_elbo"]) for row in csv.DictReader(handle)]


def test_a_run_records_its_command_versions_and_start(run_a: Path) -> None:
    record = json.loads((run_a / "config.json").read_text())
    assert record["command"][:2] == ["pyro-vae", "train"] and "--latent-dims" in record["command"]
    assert set(record["versions"]) == {"pyro_vae", "torch", "pyro", "python"}
    assert record["versions"]["torch"] == torch.__version__
    assert record["started"].endswith("+00:00")


def test_train_config_reproduces_a_run_bit_for_bit(run_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert (
        main(["train", "--config", str(run_a / "config.json"), "--out", str(out), "--quiet"]) == 0
    )
    a, b = _weights(run_a), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run_a) == _metrics(out)
    record_a, record_b = (json.loads((r / "config.json").read_text()) for r in (run_a, out))
    assert all(record_a[key] == record_b[key] for key in ("model", "train", "data"))


def test_flags_beside_a_config_override_it(run_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    argv = ["train", "--config", str(run_a / "config.json"), "--epochs", "1", "--seed", "5"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    record_a, record_c = (json.loads((r / "config.json").read_text()) for r in (run_a, out))
    assert record_c["train"]["num_epochs"] == 1 and record_c["train"]["seed"] == 5
    assert record_c["model"] == record_a["model"]


def test_load_run_and_fit_give_the_cli_numbers(run_a: Path) -> None:
    run = load_run(run_a)
    assert run.model.latent_dims == (3, 2) and run.train.seed == 3
    history = fit(run.build(), load_dataset(run.data), run.train, progress=False)
    assert [(repr(h["train_elbo"]), repr(h["valid_elbo"])) for h in history] == _metrics(run_a)


def test_a_toml_file_sets_options_and_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'latent_dims = [3, 2]\nguide = "diagonal"\nhidden_dims = [16]\nepochs = 1\nquiet = true\n'
        '[train]\nlr = 0.002\n[model]\nlikelihood = "binomial"\n'
    )
    options = train_options({"latent_dims": [3, 2], "train": {"lr": 0.002, "num_epochs": 4}})
    assert options == {"latent_dims": [3, 2], "lr": 0.002, "epochs": 4}
    out = tmp_path / "t"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["model"]["latent_dims"] == [3, 2] and record["model"]["likelihood"] == "binomial"
    assert record["train"]["lr"] == 0.002 and record["train"]["num_epochs"] == 1


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ('colour = "red"\n', "c.toml", "unknown settings ['colour']"),
        ("[model]\nwidth = 3\n", "c.toml", "unknown model fields ['width']"),
        ("{not json", "c.json", "not valid JSON"),
        ("[1, 2]", "c.json", "expected a table of settings, got list"),
        ('{"train": 3}', "c.json", "'train' must be a table"),
    ],
)
def test_bad_config_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, name: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_commands_refuse_a_malformed_run_record(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    run.mkdir()
    for text in ("[]", '"a string"', "{}"):
        (run / "config.json").write_text(text)
        for command in (["evaluate", str(run)], ["sample", str(run)], ["gaps", str(run)]):
            capsys.readouterr()
            assert main(command) == 2, (text, command)
            assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(RunError, match="not a usable run configuration"):
        load_run(run)


def test_train_draws_curves_and_evaluate_keeps_each_split(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (run_a / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for split in ("test", "valid"):
        assert main(["evaluate", str(run_a), "--split", split, "--num-samples", "5"]) == 0
    out = capsys.readouterr().out
    stored = json.loads((run_a / "eval.json").read_text())
    assert set(stored) == {"test", "valid"} and f"wrote {run_a / 'eval.json'}" in out
    assert stored["valid"]["num_samples"] == 5 and stored["valid"]["split"] == "valid"
    assert set(stored["test"]["layer_kl"]) == {"z1", "z2"}


def test_show_summarizes_runs_and_draws_their_curves(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["evaluate", str(run_a), "--num-samples", "5", "--quiet"]) == 0
    bare = tmp_path / "bare"  # a run folder whose first epoch has not ended
    bare.mkdir()
    (bare / "config.json").write_text((run_a / "config.json").read_text())
    capsys.readouterr()
    picture = tmp_path / "curves.png"
    assert main(["show", str(run_a), str(bare), "--curves", str(picture)]) == 2  # bare: no curve
    assert "metrics.csv: no such file" in capsys.readouterr().err
    assert main(["show", str(run_a), str(bare)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | data | model | epochs | best epoch | best valid ELBO")
    stored = json.loads((run_a / "eval.json").read_text())["test"]
    metrics = _metrics(run_a)
    best = max(float(valid) for _, valid in metrics)
    assert (
        f"| {run_a} | digits | z 3,2 bottom-up, iaf, mixture prior, binomial, mlp | 2 |"
        in lines[2]
    )
    assert (
        f"| {best:.3f} | test | {stored['log_likelihood']:.3f} | {stored['gap']:.3f} |" in lines[2]
    )
    assert lines[3].endswith("|  |  |  |  |  |  |") and str(bare) in lines[3]
    assert main(["show", str(run_a), "--json", "--curves", str(picture)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["epochs"] == 2 and row["best_valid_elbo"] == best and picture.stat().st_size > 0
