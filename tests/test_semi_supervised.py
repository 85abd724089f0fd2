"""The M2 program of scripts/semi_supervised.py: its enumerated ELBO, its plate, its run."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from script_loader import load_script

semi_supervised = load_script("semi_supervised")


def tiny_m2() -> tuple[torch.nn.Module, torch.Tensor]:
    """M2 with P = 6 pixels, K = 3 classes, D = 2, in float64, and 5 binary images."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    m2 = semi_supervised.M2(6, 3, latent_dim=2, hidden_dims=(8,)).double()
    x = torch.bernoulli(torch.full((5, 6), 0.5, dtype=torch.float64))
    return m2, x


@pytest.mark.parametrize("num_data", [None, 20])
def test_unlabeled_loss_is_the_exact_sum_over_labels(num_data: int | None) -> None:
    m2, x = tiny_m2()
    batch, num_classes = x.shape[0], 3
    pyro.set_rng_seed(1)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        m2.model, m2.guide, x, num_data=num_data
    )
    pyro.set_rng_seed(1)  # the same draws of z as inside TraceEnum_ELBO
    enumerated = poutine.enum(m2.guide, first_available_dim=-2)
    guide_trace = poutine.trace(enumerated).get_trace(x, num_data=num_data)
    model_trace = poutine.trace(poutine.replay(m2.model, trace=guide_trace)).get_trace(
        x, num_data=num_data
    )
    z = guide_trace.nodes["m2.z"]["value"]  # one draw per class: (K, B, D)
    assert z.shape == (num_classes, batch, 2)
    assert torch.equal(model_trace.nodes["m2.z"]["value"], z)
    with torch.no_grad():
        onehot = torch.eye(num_classes, dtype=x.dtype)[:, None, :].expand(-1, batch, -1)
        log_q_y = m2.classifier(x).log_softmax(-1).T  # (K, B)
        log_p_y = -math.log(num_classes)
        q_z = m2.vae.encoder(torch.cat([x.expand(num_classes, -1, -1), onehot], -1)).base_dist
        log_q_z = torch.distributions.Normal(q_z.loc, q_z.scale).log_prob(z).sum(-1)
        log_p_z = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = m2.vae.decoder(torch.cat([z, onehot], -1))
        log_p_x = -F.binary_cross_entropy_with_logits(
            logits, x.expand(num_classes, -1, -1), reduction="none"
        ).sum(-1)
        elbo = (log_q_y.exp() * (log_p_y + log_p_x + log_p_z - log_q_z - log_q_y)).sum()
    scale = 1.0 if num_data is None else num_data / batch
    assert loss.dtype == torch.float64
    assert torch.allclose(loss.detach(), -scale * elbo, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("labeled", [False, True])
def test_label_latent_and_pixels_share_the_one_data_plate(labeled: bool) -> None:
    m2, x = tiny_m2()
    y = torch.tensor([0, 1, 2, 0, 1]) if labeled else None
    trace = poutine.trace(m2.model).get_trace(x, y, num_data=20)
    sites = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and name != "m2.data"  # m2.data: the plate's own site
    }
    assert set(sites) == {"m2.y", "m2.z", "m2.x"} | ({"m2.y_aux"} if labeled else set())
    for name, site in sites.items():
        assert [(f.name, f.dim, f.size) for f in site["cond_indep_stack"]] == [("m2.data", -1, 5)]
        weight = m2.alpha if name == "m2.y_aux" else 1.0  # the classification term's alpha
        assert site["scale"] == pytest.approx(weight * 20 / 5)  # num_data / batch
    assert trace.nodes["m2.y"]["is_observed"] == labeled
    assert trace.nodes["m2.x"]["value"].shape == (5, 6)


def test_run_on_a_small_digits_subset_reports_the_documented_keys() -> None:
    x_train, y_train, x_test, y_test = semi_supervised.load_digits_with_labels()
    assert x_train.shape == (1497, 64) and x_test.shape == (300, 64)
    assert set(x_train.unique().tolist()) <= {0.0, 1.0}
    result = semi_supervised.run(
        x_train[:200], y_train[:200], x_test[:50], y_test[:50], epochs=1, batch_size=50
    )
    assert set(result) == {
        "test_accuracy",
        "labeled_only_accuracy",
        "num_labeled",
        "num_unlabeled",
        "num_test",
        "epochs",
        "train_seconds",
    }
    assert result["num_labeled"] == 20 and result["num_unlabeled"] == 180
    assert result["num_test"] == 50 and result["epochs"] == 1
    assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["labeled_only_accuracy"] <= 1
