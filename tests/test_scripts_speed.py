"""The speed and memory scripts: the plain twins compute pyro_vae's objective; smoke runs."""

from __future__ import annotations

from types import ModuleType
from unittest import mock

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from script_loader import load_script

from pyro_vae import VAE, VAEConfig
from pyro_vae.data import Dataset
from pyro_vae.distributed import ELBOLoss
from pyro_vae.train import compiles_loss


def _load(name: str) -> ModuleType:
    return load_script(name)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("benchmark_speed")


def _copy_weights(vae: VAE, twin: torch.nn.Module) -> None:
    state = {}
    for name, value in vae.state_dict().items():
        if name.startswith("encoder."):
            name = name.removeprefix("encoder.")
            name = name.replace("tril.", "head.").replace("factor.", "head.")
        elif name.startswith("decoder.net."):
            name = name.replace("decoder.net.", "decoder.")
        else:
            continue
        state[name] = value
    missing = twin.load_state_dict(state, strict=False).missing_keys
    assert missing == (["mask"] if hasattr(twin, "mask") else [])


@pytest.mark.parametrize("guide", ["diagonal", "full", "lowrank"])
def test_plain_twin_computes_the_same_loss(float64: None, bench: ModuleType, guide: str) -> None:
    vae = VAE(VAEConfig(7, 3, (6,), guide))
    twin = bench.PlainVAE(7, 3, (6,), guide)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.5)  # correlated guides too, not their zero start
    _copy_weights(vae, twin)
    x = torch.bernoulli(torch.full((5, 7), 0.5))
    torch.manual_seed(3)
    expected = ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))(x, 40)
    torch.manual_seed(3)  # the same noise draws
    assert torch.allclose(twin.loss(x, 40), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("guide", ["iaf", "planar", "radial"])
def test_plain_flow_twin_computes_the_same_loss(
    float64: None, bench: ModuleType, guide: str
) -> None:
    """Same networks, same noise: the hand-written maps give Pyro's transformed log q."""
    vae = VAE(VAEConfig(7, 3, (6,), guide, {"num_flows": 3}))
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.5)
    twin = bench.PlainFlowVAE(vae.encoder, vae.decoder.net)
    x = torch.bernoulli(torch.full((5, 7), 0.5))
    torch.manual_seed(3)
    expected = ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))(x, 40)
    torch.manual_seed(3)
    assert torch.allclose(twin.loss(x, 40), expected, rtol=1e-10, atol=0)
    torch.manual_seed(4)  # other noise: another value, so the comparison is not vacuous
    assert not torch.allclose(twin.loss(x, 40), expected, rtol=1e-6, atol=0)


def test_textbook_vae_computes_the_elbo_with_analytic_kl(float64: None, bench: ModuleType) -> None:
    """Same weights, same noise: the textbook loss is pyro_vae's mean-field (analytic KL)
    objective, an independent implementation of the same number."""
    vae = VAE(VAEConfig(7, 3, (6, 5), "diagonal"))
    book = bench.TextbookVAE(7, 3, (6, 5))
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.5)
    state = {}
    for name, value in vae.state_dict().items():
        name = name.replace("encoder.trunk.", "encoder.").replace("decoder.net.", "decoder.")
        name = name.replace("encoder.loc.", "mu.").replace("encoder.raw_scale.", "raw_sigma.")
        state[name] = value
    state = {k: v for k, v in state.items() if not k.startswith("prior_")}
    book.load_state_dict(state)  # strict: every tensor has its counterpart
    x = torch.bernoulli(torch.full((5, 7), 0.5))
    torch.manual_seed(3)
    expected = ELBOLoss(vae, TraceMeanField_ELBO(max_plate_nesting=1))(x, 40)
    torch.manual_seed(3)
    assert torch.allclose(book.loss(x, 40), expected, rtol=1e-10, atol=0)
    torch.manual_seed(3)  # the single-sample KL estimate of Trace_ELBO differs
    assert not torch.allclose(
        book.loss(x, 40), ELBOLoss(vae, Trace_ELBO(max_plate_nesting=1))(x, 40), rtol=1e-6
    )


def test_benchmark_speed_smoke(bench: ModuleType, capsys: pytest.CaptureFixture) -> None:
    argv = ["--steps", "2", "--repeats", "1", "--latent-dim", "2", "--hidden-dims", "8"]
    argv += ["--guides", "diagonal", "full", "iaf", "--variants", "plain", "textbook", "default"]
    argv += ["svi", "stl", "iwae", "dreg", "--num-particles", "3"]
    assert bench.main([*argv, "--devices", "cpu", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "| cpu | full | default |" in table and "| cpu | diagonal | plain |" in table
    assert "| cpu | iaf | plain |" in table and "| cpu | diagonal | textbook |" in table
    assert "| cpu | full | textbook |" not in table  # the textbook VAE is diagonal
    assert all(f"| cpu | full | {variant} |" in table for variant in ("stl", "iwae", "dreg"))


def test_benchmark_speed_estimator_variants_train_their_objective(bench: ModuleType) -> None:
    args = bench.parse_args(["--latent-dim", "2", "--hidden-dims", "8", "--num-particles", "3"])
    data = Dataset(torch.bernoulli(torch.full((8, 5), 0.5)), torch.ones(4, 5), None, (1, 5))
    seen = {}
    for variant in ("stl", "stl-eager", "iwae", "dreg"):
        with mock.patch.object(bench, "pyro_vae_epoch", lambda vae, data, config: config):
            config = bench.build(variant, "diagonal", data, args, torch.device("cpu"))
        seen[variant] = (config.objective, config.gradient_estimator, config.num_particles,
                         compiles_loss(config))  # fmt: skip
    assert seen == {"stl": ("elbo", "stl", 1, True), "stl-eager": ("elbo", "stl", 1, False),
                    "iwae": ("iwae", "pathwise", 3, False),
                    "dreg": ("iwae", "dreg", 3, False)}  # fmt: skip


def test_benchmark_is_smoke(capsys: pytest.CaptureFixture) -> None:
    argv = ["--num-images", "4", "--num-samples", "30", "--latent-dim", "2", "--threads", "1"]
    assert _load("benchmark_is").main(argv) == 0
    assert "MiB while evaluating" in capsys.readouterr().out
