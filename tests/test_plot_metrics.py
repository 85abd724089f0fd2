"""scripts/plot_metrics.py: reads run folders' metrics.csv and writes one PNG."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script


def _load() -> ModuleType:
    return load_script("plot_metrics")


def _run(folder: Path, valid: list[float]) -> Path:
    folder.mkdir()
    lines = ["epoch,train_elbo,valid_elbo,seconds"]
    lines += [f"{i + 1},{v + 1},{v},0.5" for i, v in enumerate(valid)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_plots_runs_and_reads_their_columns(tmp_path: Path) -> None:
    script = _load()
    a = _run(tmp_path / "a", [-120.0, -110.0, -111.0])
    b = _run(tmp_path / "b", [-130.0, -105.0])
    assert script.read_metrics(a) == {
        "epoch": [1.0, 2.0, 3.0],
        "train_elbo": [-119.0, -109.0, -110.0],
        "valid_elbo": [-120.0, -110.0, -111.0],
    }
    out = tmp_path / "curves.png"
    assert script.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _load().main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.csv" in err[0]
    assert not (tmp_path / "x.png").exists()
