"""One-epoch smoke test of scripts/benchmark_guides.py on tiny synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
from script_loader import load_script


def _load_script():  # noqa: ANN202
    return load_script("benchmark_guides")


def test_benchmark_script_writes_a_table(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, train=rng.integers(0, 2, (40, 9)), valid=rng.integers(0, 2, (10, 9)))
    out = tmp_path / "table.md"
    script = _load_script()
    argv = ["--data", "binarized-mnist", str(data), "--epochs", "1", "--batch-size", "20"]
    argv += ["--latent-dim", "2", "--hidden-dims", "6", "--num-flows", "2", "--num-samples", "8"]
    argv += ["--num-points", "5", "--out", str(out)]
    assert script.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert [row["guide"] for row in rows] == list(script.DEFAULT_GUIDES)
    for row in rows:
        assert row["num_points"] == 5
        assert math.isclose(row["gap"], row["IS log p(x)"] - row["ELBO"], abs_tol=1e-9)
        assert all(math.isfinite(row[c]) for c in script.COLUMNS[1:])
        assert row["options"] == ({} if row["guide"] in ("diagonal", "full") else {"num_flows": 2})
    table = out.read_text().splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| diagonal | ") and table[-1].startswith("| sylvester | ")
