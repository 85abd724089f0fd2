"""Smoke tests of the worked examples in scripts/ on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from script_loader import load_script

from pyro_vae import VAE, VAEConfig


def labeled_data(n: int, num_classes: int, p: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % num_classes
    protos = torch.bernoulli(torch.full((num_classes, p), 0.5))
    x = torch.where(torch.rand(n, p) < 0.1, 1 - protos[y], protos[y])
    return x, y


def test_semi_supervised_enumerates_the_label_and_reports_accuracy() -> None:
    m2_script = load_script("semi_supervised")
    x, y = labeled_data(40, 3)
    m2 = m2_script.M2(6, 3, latent_dim=2, hidden_dims=(8,))
    enumerated = poutine.enum(m2.guide, first_available_dim=-2)
    trace = poutine.trace(enumerated).get_trace(x[:5], num_data=30)
    assert trace.nodes["m2.y"]["value"].shape == (3, 1)  # all classes, in parallel
    assert trace.nodes["m2.z"]["value"].shape == (3, 5, 2)
    trace = poutine.trace(enumerated).get_trace(x[5:7], y[5:7], num_data=10)
    assert "m2.y" not in trace.nodes  # observed in the model, not sampled
    result = m2_script.run(x[:30], y[:30], x[30:], y[30:], epochs=2, batch_size=10)
    assert result["num_labeled"] == 3 and result["num_unlabeled"] == 27
    assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["labeled_only_accuracy"] <= 1


def test_inpainting_fills_the_missing_half_and_keeps_the_vae_fixed(tmp_path: Path) -> None:
    inpainting = load_script("inpainting")
    vae = VAE(VAEConfig(6, 2, (8,), "diagonal", image_shape=(2, 3))).eval()
    before = [p.detach().clone() for p in vae.parameters()]
    x, _ = labeled_data(4, 2)
    mask = inpainting.top_half_mask((2, 3))
    assert mask.tolist() == [True, True, True, False, False, False]
    result = inpainting.run(vae, x, x, tmp_path / "fill.png", num_steps=5, num_draws=4)
    assert result["missing_pixels_per_image"] == 3 and 0 <= result["filled_accuracy"] <= 1
    assert (tmp_path / "fill.png").stat().st_size > 0
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))
    assert set(pyro.get_param_store().keys()) >= {"inpaint.loc", "inpaint.scale"}


def test_nested_model_puts_the_vae_inside_the_class_plate(tmp_path: Path) -> None:
    nested = load_script("nested_model")
    x, y = labeled_data(24, 2)
    vae = VAE(VAEConfig(6, 2, (8,), "diagonal"))
    program = nested.ClassLatentModel(vae, num_classes=2, images_per_class=12)
    batch = torch.stack([x[y == 0][:3], x[y == 1][:3]])  # (G, B, P)
    trace = poutine.trace(program.model).get_trace(batch)
    assert trace.nodes["nested.c"]["value"].shape == (2, 1, 2)
    assert trace.nodes["vae.z"]["value"].shape == (2, 3, 2)
    frames = {f.name: f.dim for f in trace.nodes["vae.z"]["cond_indep_stack"]}
    assert frames == {"nested.classes": -2, "vae.data": -1}
    result = nested.run(x, y, x, y, (2, 3), num_steps=20, images_per_step=3, latent_dim=2,
                        out=tmp_path / "nested.png")  # fmt: skip
    assert 0 <= result["nearest_class_accuracy"] <= 1 and result["spread"] > 0
    assert (tmp_path / "nested.png").stat().st_size > 0


def test_benchmark_priors_runs_every_prior_on_a_tiny_npz(tmp_path: Path) -> None:
    benchmark = load_script("benchmark_priors")
    rng = np.random.default_rng(0)
    data = {
        s: (rng.random((n, 16)) < 0.3).astype(np.float32)
        for s, n in [("train", 40), ("valid", 30)]
    }
    np.savez(tmp_path / "tiny.npz", **data)
    out = tmp_path / "runs.jsonl"
    argv = ["--data", str(tmp_path / "tiny.npz"), "--priors", "standard", "mixture", "vamp",
            "--epochs", "1", "--batch-size", "10", "--latent-dim", "2", "--hidden-dims", "8",
            "--num-components", "3", "--num-select", "10", "--num-eval", "20",
            "--num-samples", "5", "--out", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prior"] for r in rows] == ["standard", "mixture", "vamp"]
    assert all(r["num_points"] == 20 and r["log_likelihood"] >= r["elbo"] - 5 for r in rows)
    with pytest.raises(SystemExit):
        benchmark.main([*argv[:2], "--num-eval", "100"])
