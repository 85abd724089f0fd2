"""Bad-input matrix: every entry point rejects bad input in one line naming value and rule."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from robust_helpers import cli_train, save_binary_npy, tiny_config, tiny_data, tiny_vae

from pyro_vae.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from pyro_vae.cli import main
from pyro_vae.data import DataError, DataSpec, load_dataset
from pyro_vae.evaluate import active_units, elbo, evaluate, log_likelihood
from pyro_vae.guides import make_guide
from pyro_vae.model import MAX_LATENT_DIM, VAE, VAEConfig
from pyro_vae.train import TrainConfig, fit


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and broken data files, and run folders, shared by the CLI cases."""
    root = tmp_path_factory.mktemp("inputs")
    good = save_binary_npy(root / "good.npy")  # 40 images of 16 pixels
    arrays = {
        "half": np.full((40, 16), 0.5, np.float32),
        "nan": np.where(np.eye(40, 16) > 0, np.nan, 0.0),
        "inf": np.where(np.eye(40, 16) > 0, np.inf, 1.0),
        "empty": np.zeros((0, 16), np.float32),
        "rank1": np.zeros(16, np.float32),
        "rank4": np.zeros((2, 2, 2, 2), np.float32),
        "complex": np.zeros((40, 16), np.complex64),
        "strings": np.full((40, 16), "1"),
        "pixels25": np.zeros((40, 25), np.float32),
    }
    paths = {"good": good, "root": root}
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array)
        paths[name] = root / f"{name}.npy"
    np.save(root / "objects.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    paths["objects"] = root / "objects.npy"
    paths["truncated"] = root / "truncated.npy"
    paths["truncated"].write_bytes(good.read_bytes()[:100])
    paths["garbage"] = root / "garbage.npy"
    paths["garbage"].write_text("not an array\n")
    paths["missing"] = root / "missing.npy"
    paths["unreadable"] = save_binary_npy(root / "unreadable.npy")
    paths["unreadable"].chmod(0)
    paths["run"] = root / "run"
    assert main(cli_train(good, paths["run"], 1)) == 0
    payload = torch.load(paths["run"] / "checkpoint.pt", weights_only=True)
    for name, change in (("v99", "version"), ("evil", "evil"), ("cut", "truncate")):
        run = paths[name] = root / f"run-{name}"
        shutil.copytree(paths["run"], run)
        if change == "version":
            torch.save({**payload, "format_version": 99}, run / "checkpoint.pt")
        elif change == "evil":
            torch.save({**payload, "hook": os.getcwd}, run / "checkpoint.pt")
            last = torch.load(run / "last.pt", weights_only=True)
            torch.save({**last, "hook": os.getcwd}, run / "last.pt")
        else:
            (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:300])
    paths["notrun"] = root / "notrun"
    paths["notrun"].mkdir()
    return paths


P = dict[str, Path]
TRAIN_CASES: list[tuple[str, Callable[[P], list[str]], list[str]]] = [
    ("unknown guide", lambda p: ["--guide", "nope"], ["--guide", "'nope'", "choose"]),
    ("unknown data name", lambda p: ["--data", "nope"], ["'nope'", "choose one of"]),
    ("zero latent", lambda p: ["--latent-dim", "0"], ["--latent-dim", "'0'", "positive"]),
    ("negative latent", lambda p: ["--latent-dim", "-3"], ["'-3'", "positive"]),
    ("huge latent", lambda p: ["--latent-dim", "5000"], ["5000", f"<= {MAX_LATENT_DIM}"]),
    ("zero batch", lambda p: ["--batch-size", "0"], ["--batch-size", "'0'"]),
    ("zero epochs", lambda p: ["--epochs", "0"], ["--epochs", "'0'"]),
    ("bad hidden", lambda p: ["--hidden-dims", "8,0"], ["--hidden-dims", "'8,0'"]),
    ("zero particles", lambda p: ["--num-particles", "0"], ["--num-particles", "'0'"]),
    ("zero lr", lambda p: ["--lr", "0"], ["--lr", "'0'", "positive"]),
    ("negative lr", lambda p: ["--lr", "-0.001"], ["'-0.001'", "positive"]),
    ("negative lr, exponent", lambda p: ["--lr=-1e-3"], ["'-1e-3'", "positive"]),
    ("nan lr", lambda p: ["--lr", "nan"], ["'nan'", "positive"]),
    ("inf lr", lambda p: ["--lr", "inf"], ["'inf'", "finite"]),
    ("zero clip", lambda p: ["--clip-norm", "0"], ["--clip-norm", "'0'"]),
    ("bad guide option", lambda p: ["--guide-option", "bogus=1"], ["bogus", "'diagonal'"]),
    ("bad binarize", lambda p: ["--binarize", "bogus"], ["--binarize", "'bogus'"]),
    ("too many data words", lambda p: ["--data", "array", "a", "b"], ["NAME [PATH]"]),
    ("missing file", lambda p: ["--data", str(p["missing"])], ["missing.npy", "no such"]),
    ("truncated file", lambda p: ["--data", str(p["truncated"])], ["truncated.npy", ".npy"]),
    ("garbage file", lambda p: ["--data", str(p["garbage"])], ["garbage.npy", "not a .npy"]),
    ("pickled objects", lambda p: ["--data", str(p["objects"])], ["objects.npy"]),
    ("complex", lambda p: ["--data", str(p["complex"])], ["complex64", "numeric"]),
    ("strings", lambda p: ["--data", str(p["strings"])], ["strings.npy", "numeric"]),
    ("rank 1", lambda p: ["--data", str(p["rank1"])], ["(16,)", "(N, P)"]),
    ("rank 4", lambda p: ["--data", str(p["rank4"])], ["(2, 2, 2, 2)", "(N, P)"]),
    ("seed negative", lambda p: ["--seed", "-1"], ["--seed", "'-1'"]),
    ("seed overflow", lambda p: ["--seed", "9" * 25], ["--seed", "0 to 4294967295"]),
    ("seed text", lambda p: ["--seed", "abc"], ["--seed", "'abc'"]),
    ("unknown inference", lambda p: ["--inference", "sideways"], ["--inference", "'sideways'"]),
    ("unknown decoder input", lambda p: ["--decoder-input", "z9"], ["--decoder-input", "'z9'"]),
    ("latent dims zero", lambda p: ["--latent-dims", "4,0"], ["--latent-dims", "'4,0'"]),
    ("latent dims text", lambda p: ["--latent-dims", "a,b"], ["--latent-dims", "'a,b'"]),
    (
        "layer guides count",
        lambda p: ["--latent-dims", "3,2", "--layer-guides", "diagonal"],
        ["layer_guides", "(2)"],
    ),
    (
        "ladder with full",
        lambda p: ["--latent-dims", "3,2", "--inference", "ladder", "--guide", "full"],
        ["inference 'ladder'", "guide 'full'"],
    ),
    ("negative free bits", lambda p: ["--free-bits", "-1"], ["--free-bits", "'-1'"]),
    ("negative warm-up", lambda p: ["--kl-warmup", "-2"], ["--kl-warmup", "'-2'"]),
    ("unknown schedule", lambda p: ["--lr-schedule", "zigzag"], ["--lr-schedule", "'zigzag'"]),
    ("gamma above one", lambda p: ["--lr-gamma", "1.5"], ["lr_gamma", "1.5"]),
    ("zero patience", lambda p: ["--patience", "0"], ["--patience", "'0'"]),
    ("unknown objective", lambda p: ["--objective", "nope"], ["--objective", "'nope'"]),
    ("unknown prior", lambda p: ["--prior", "nope"], ["--prior", "'nope'"]),
    ("unknown arch", lambda p: ["--arch", "nope"], ["--arch", "'nope'"]),
    ("unknown likelihood", lambda p: ["--likelihood", "nope"], ["--likelihood", "'nope'"]),
    ("unknown preset", lambda p: ["--preset", "nope"], ["--preset", "'nope'"]),
    (
        "huge mixture",
        lambda p: ["--prior", "mixture", "--prior-option", "num_components=100000000"],
        ["num_components 100000000", "GiB"],
    ),
    ("huge hidden", lambda p: ["--hidden-dims", "1000000000000"], ["GiB"]),
    (
        "dreg with elbo",
        lambda p: ["--gradient-estimator", "dreg"],
        ["gradient_estimator 'dreg'"],
    ),
    (
        "stl with free bits",
        lambda p: ["--gradient-estimator", "stl", "--free-bits", "1"],
        ["'stl'", "free_bits"],
    ),
    (
        "jit with vmf",
        lambda p: ["--jit", "--guide", "vmf", "--latent", "sphere"],
        ["jit=True", "VonMisesFisherGuide is not traceable"],
    ),
    ("conv on 4x4", lambda p: ["--arch", "conv"], ["arch 'conv'", "28x28"]),
    ("conditional, no labels", lambda p: ["--conditional"], ["label"]),
    ("not binary", lambda p: ["--data", str(p["half"])], ["{0, 1}", "[0.5, 0.5]", "--binarize"]),
    ("nan pixels", lambda p: ["--data", str(p["nan"])], ["nan.npy", "NaN or inf"]),
    ("inf pixels", lambda p: ["--data", str(p["inf"])], ["inf.npy", "NaN or inf"]),
    ("empty", lambda p: ["--data", str(p["empty"])], ["empty", "(0, 16)"]),
    ("batch too large", lambda p: ["--batch-size", "1000"], ["1000", "32 images"]),
    ("folder is a file", lambda p: ["--out", str(p["good"])], ["good.npy", "not a folder"]),
    ("unknown device", lambda p: ["--device", "tpu"], ["'tpu'", "cpu, cuda"]),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append(("no gpu", lambda p: ["--device", "cuda"], ["cuda", "no CUDA GPU"]))
if os.geteuid() != 0:  # root reads any file
    TRAIN_CASES.append(("unreadable", lambda p: ["--data", str(p["unreadable"])], ["denied"]))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    status = main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("extra", "expected"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES]
)
def test_train_rejects(
    files: P, tmp_path: Path, capsys: pytest.CaptureFixture, extra: Callable, expected: list[str]
) -> None:
    out = tmp_path / "out"
    before = sorted(p.name for p in files["run"].iterdir())
    status, err = run_cli(cli_train(files["good"], out, 1, *extra(files)), capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("pyro-vae: error: "), err
    assert all(word in err[0] for word in expected), err[0]
    assert not out.exists()  # nothing was written for a rejected run
    assert sorted(p.name for p in files["run"].iterdir()) == before


def test_existing_run_needs_resume_or_overwrite(
    files: P, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    status, err = run_cli(cli_train(files["good"], run, 1), capsys)
    assert status == 2 and len(err) == 1
    assert "--resume" in err[0] and "--overwrite" in err[0] and str(run) in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps


OTHER_CASES: list[tuple[str, Callable[[P], list[str]], list[str]]] = [
    ("evaluate newer format", lambda p: ["evaluate", str(p["v99"])], ["format 99", "reads"]),
    ("evaluate truncated", lambda p: ["evaluate", str(p["cut"])], ["not a readable"]),
    ("evaluate unsafe", lambda p: ["evaluate", str(p["evil"])], ["refused to load"]),
    ("evaluate not a run", lambda p: ["evaluate", str(p["notrun"])], ["not a run folder"]),
    ("evaluate missing", lambda p: ["evaluate", str(p["missing"])], ["not a run folder"]),
    (
        "evaluate pixel mismatch",
        lambda p: [
            "evaluate",
            str(p["run"]),
            "--data",
            str(p["pixels25"]),
            "--binarize",
            "static",
        ],
        ["25 pixels", "expects 16"],
    ),
    (
        "evaluate zero samples",
        lambda p: ["evaluate", str(p["run"]), "--num-samples", "0"],
        ["'0'"],
    ),
    ("sample not png", lambda p: ["sample", str(p["run"]), "--out", "x.jpg"], ["x.jpg", "PNG"]),
    ("sample zero images", lambda p: ["sample", str(p["run"]), "-n", "0"], ["'0'"]),
    ("unknown command", lambda p: ["fly"], ["'fly'"]),
    ("resume a non-run", lambda p: ["train", "--resume", str(p["notrun"])], ["not a run"]),
    ("resume missing", lambda p: ["train", "--resume", str(p["missing"])], ["not a run"]),
    ("resume + overwrite", lambda p: ["train", "--resume", str(p["run"]), "--overwrite"], ["one"]),
    ("resume finished", lambda p: ["train", "--resume", str(p["run"])], ["trained 1 of 1"]),
    (
        "resume, other guide",
        lambda p: ["train", "--resume", str(p["run"]), "--guide", "full", "--epochs", "2"],
        ["--guide cannot change", "config.json"],
    ),
    (
        "resume, guide option",
        lambda p: ["train", "--resume", str(p["run"]), "--guide-option", "x=1", "--epochs", "2"],
        ["--guide-option cannot change"],
    ),
    (
        "resume unsafe state",
        lambda p: ["train", "--resume", str(p["evil"]), "--epochs", "2"],
        ["refused to load"],
    ),
    (
        "evaluate for months",
        lambda p: ["evaluate", str(p["run"]), "--num-samples", "1000000000000000"],
        ["num_samples 1000000000000000 for each of", "days"],
    ),
    ("seed overflow", lambda p: ["evaluate", str(p["run"]), "--seed", "9" * 30], ["seed", "0 to"]),
    ("evaluate bad split", lambda p: ["evaluate", str(p["run"]), "--split", "x"], ["'x'"]),
    ("evaluate zero points", lambda p: ["evaluate", str(p["run"]), "--num-points", "0"], ["'0'"]),
    ("sample negative", lambda p: ["sample", str(p["run"]), "-n", "-4"], ["'-4'"]),
    ("sample huge", lambda p: ["sample", str(p["run"]), "-n", "10000000000"], ["GiB"]),
    ("sample not a run", lambda p: ["sample", str(p["notrun"])], ["not a run folder"]),
    ("sample unsafe", lambda p: ["sample", str(p["evil"])], ["refused to load"]),
    ("gaps not a run", lambda p: ["gaps", str(p["notrun"])], ["not a run folder"]),
    ("gaps zero steps", lambda p: ["gaps", str(p["run"]), "--num-steps", "0"], ["'0'"]),
    ("show missing", lambda p: ["show", str(p["missing"])], ["missing"]),
    ("latent not a run", lambda p: ["latent", str(p["notrun"])], ["not a run folder"]),
    ("export not a run", lambda p: ["export", str(p["notrun"]), str(p["root"] / "x")], ["run"]),
    ("export unsafe", lambda p: ["export", str(p["evil"]), str(p["root"] / "y")], ["refused"]),
    ("compare unknown guide", lambda p: ["compare", "--guides", "nope"], ["'nope'"]),
    ("compare zero seeds", lambda p: ["compare", "--seeds", "0"], ["--seeds", "'0'"]),
]


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES]
)
def test_other_commands_reject(
    files: P, capsys: pytest.CaptureFixture, argv: Callable, expected: list[str]
) -> None:
    status, err = run_cli(argv(files), capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("pyro-vae: error: "), err
    assert all(word in err[0] for word in expected), err[0]


API_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("lr zero", lambda: TrainConfig(lr=0), ValueError, "lr .* got 0"),
    ("lr nan", lambda: TrainConfig(lr=float("nan")), ValueError, "got nan"),
    ("batch zero", lambda: TrainConfig(batch_size=0), ValueError, "batch_size .* got 0"),
    ("epochs float", lambda: TrainConfig(num_epochs=1.5), ValueError, "num_epochs .* 1.5"),
    ("clip negative", lambda: TrainConfig(clip_norm=-2.0), ValueError, "clip_norm .* -2.0"),
    ("data_dim zero", lambda: VAEConfig(0), ValueError, "data_dim .* got 0"),
    ("latent huge", lambda: VAEConfig(16, latent_dim=5000), ValueError, "5000"),
    ("guide unknown", lambda: VAEConfig(16, guide="nope"), ValueError, "'nope'"),
    ("hidden zero", lambda: VAEConfig(16, hidden_dims=(0,)), ValueError, r"\(0,\)"),
    ("make_guide unknown", lambda: make_guide("nope", 4, 2), ValueError, "'nope'"),
    ("dataset unknown", lambda: DataSpec("nope"), DataError, "'nope'"),
    ("dataset no path", lambda: DataSpec("array"), DataError, "needs a path"),
    ("binarize unknown", lambda: DataSpec(binarize="x"), DataError, "'x'"),
    ("load missing", lambda: load_dataset(DataSpec("array", "/no/such.npy")), DataError, "such"),
    ("checkpoint missing", lambda: load_checkpoint("/no/such.pt"), CheckpointError, "such"),
    (
        "fit config type",
        lambda: fit(tiny_vae(), tiny_data(), {"lr": 1}, progress=False),
        TypeError,
        "TrainConfig, got dict",
    ),
    (
        "fit pixel mismatch",
        lambda: fit(VAE16(), tiny_data(), tiny_config(1), progress=False),
        ValueError,
        "12 pixels .* expects 16",
    ),
    (
        "fit batch too large",
        lambda: fit(tiny_vae(), tiny_data(), TrainConfig(batch_size=49), progress=False),
        ValueError,
        "batch_size 49 .*48 images",
    ),
    (
        "fit resume without folder",
        lambda: fit(tiny_vae(), tiny_data(), tiny_config(1), resume=True),
        ValueError,
        "run_dir",
    ),
]


_X = torch.bernoulli(torch.full((5, 16), 0.5), generator=torch.Generator().manual_seed(0))


def _vae() -> VAE:
    return VAE(VAEConfig(16, 2, (8,), "diagonal"))


def _hierarchy() -> VAE:
    return VAE(
        VAEConfig(16, hidden_dims=(8,), guide="diagonal", latent_dims=(3, 2), decoder_input="all")
    )


API_CASES += [
    ("fit data str", lambda: fit(_vae(), "digits", tiny_config(1)), TypeError, "data must be a"),
    ("fit data array", lambda: fit(_vae(), _X.numpy(), tiny_config(1)), TypeError, "ndarray"),
    ("fit vae str", lambda: fit("vae", tiny_data(), tiny_config(1)), TypeError, "vae must be"),
    (
        "fit callback int",
        lambda: fit(tiny_vae(), tiny_data(), tiny_config(1), progress=False, callbacks=[1]),
        TypeError,
        "callbacks must be a Callback, got int",
    ),
    (
        "fit run_dir int",
        lambda: fit(tiny_vae(), tiny_data(), tiny_config(1), run_dir=3),
        TypeError,
        "run_dir must be a str or Path",
    ),
    ("evaluate array", lambda: evaluate(_vae(), _X.numpy()), TypeError, "torch.as_tensor"),
    ("evaluate list", lambda: evaluate(_vae(), _X.tolist()), TypeError, "got list"),
    ("evaluate ints", lambda: evaluate(_vae(), _X.long()), TypeError, "x.float()"),
    ("evaluate batch 0", lambda: evaluate(_vae(), _X, batch_size=0), ValueError, "batch_size"),
    ("evaluate batch str", lambda: evaluate(_vae(), _X, batch_size="9"), ValueError, "'9'"),
    ("evaluate K bool", lambda: evaluate(_vae(), _X, num_samples=True), ValueError, "True"),
    ("evaluate K float", lambda: evaluate(_vae(), _X, num_samples=2.0), ValueError, "2.0"),
    ("evaluate K huge", lambda: evaluate(_vae(), _X, num_samples=10**16), ValueError, "days"),
    ("evaluate 1-d", lambda: evaluate(_vae(), _X[0]), ValueError, r"\(16,\)"),
    ("evaluate width", lambda: evaluate(_vae(), _X[:, :7]), ValueError, r"\(5, 7\)"),
    ("evaluate nan", lambda: evaluate(_vae(), _X * math.nan), ValueError, "found nan"),
    ("evaluate halves", lambda: evaluate(_vae(), _X * 0.5), ValueError, "found 0.5"),
    ("evaluate vae", lambda: evaluate("vae", _X), TypeError, "vae must be a VAE"),
    ("log_likelihood str", lambda: log_likelihood(_vae(), "x"), TypeError, "got str"),
    ("elbo array", lambda: elbo(_vae(), _X.numpy()), TypeError, "ndarray"),
    ("active_units array", lambda: active_units(_vae(), _X.numpy()), TypeError, "ndarray"),
    ("active_units K 0", lambda: active_units(_vae(), _X, num_samples=0), ValueError, "got 0"),
    ("load_dataset str", lambda: load_dataset("digits"), TypeError, "spec must be a DataSpec"),
    ("DataSpec seed -1", lambda: DataSpec(seed=-1), DataError, "seed .* got -1"),
    ("DataSpec seed str", lambda: DataSpec(seed="a"), DataError, "got 'a'"),
    ("DataSpec path int", lambda: DataSpec("array", 3), TypeError, "path must be"),
    ("seed str", lambda: TrainConfig(seed="abc"), ValueError, "seed .* got 'abc'"),
    ("seed negative", lambda: TrainConfig(seed=-1), ValueError, "got -1"),
    ("seed 2**70", lambda: TrainConfig(seed=2**70), ValueError, "0 to 4294967295"),
    ("seed bool", lambda: TrainConfig(seed=True), ValueError, "got True"),
    ("VAE config dict", lambda: VAE({"data_dim": 3}), TypeError, "VAEConfig, got dict"),
    ("sample -1", lambda: _vae().sample_images(-1), ValueError, "num_images .* -1"),
    ("sample str", lambda: _vae().sample_images("3"), TypeError, "num_images must be an int"),
    ("sample 1e12", lambda: _vae().sample_images(10**12), ValueError, "GiB"),
    ("encode array", lambda: _vae().encode(_X.numpy()), TypeError, "ndarray"),
    ("encode width", lambda: _vae().encode(_X[:, :5]), ValueError, r"\(5, 5\)"),
    ("reconstruct width", lambda: _vae().reconstruct(_X[:, :5]), ValueError, "P = 16"),
    ("decode width", lambda: _vae().decode(torch.zeros(3, 5)), ValueError, "code width = 2"),
    ("decode array", lambda: _vae().decode(np.zeros((3, 2))), TypeError, "ndarray"),
    (
        "decode all layers",
        lambda: _hierarchy().decode(torch.zeros(3, 3)),
        ValueError,
        "code width = 5",
    ),
    ("model width", lambda: _vae().model(_X[:, :5]), ValueError, r"\(5, 5\)"),
    ("guide width", lambda: _vae().guide(_X[:, :5]), ValueError, r"\(5, 5\)"),
    ("guide array", lambda: _vae().guide(_X.numpy()), TypeError, "ndarray"),
    (
        "condition array",
        lambda: _vae().model(_X, condition=np.zeros((5, 2))),
        TypeError,
        "condition must be a Tensor",
    ),
    ("save_checkpoint str", lambda: save_checkpoint("/tmp/x.pt", "vae"), TypeError, "VAE"),
    (
        "decoder_input unknown",
        lambda: VAEConfig(16, latent_dims=(2, 2), decoder_input="top"),
        ValueError,
        "decoder_input 'top'",
    ),
    (
        "inference unknown",
        lambda: VAEConfig(16, latent_dims=(2, 2), inference="up"),
        ValueError,
        "inference 'up'",
    ),
]


def VAE16() -> object:  # noqa: N802
    from pyro_vae.model import VAE

    return VAE(VAEConfig(16, 2, (8,), "diagonal"))


@pytest.mark.parametrize(
    ("make", "error", "match"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_python_api_rejects(make: Callable, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        make()
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_fit_resume_from_folder_without_state(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="last.pt: no such checkpoint"):
        fit(tiny_vae(), tiny_data(), tiny_config(1), tmp_path, progress=False, resume=True)
    assert FORMAT_VERSION == 1


def test_diverging_local_svi_is_one_short_line(files: P, capsys: pytest.CaptureFixture) -> None:
    """No tensor dump: the progress bar, then one line naming the step and the remedy."""
    argv = ["gaps", str(files["run"]), "--lr", "1e30", "--num-steps", "5", "--num-points", "4"]
    status, err = run_cli(argv, capsys)
    assert status == 2 and err[-1].startswith("pyro-vae: error: local SVI diverged at step")
    assert "lower the learning rate" in err[-1] and len(err[-1]) < 200
    assert not [line for line in err[:-1] if not line.startswith("local SVI")]
