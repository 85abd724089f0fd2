"""Named training recipes (``pyro-vae train --preset NAME``) for 28x28 binarized MNIST."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """Defaults of ``pyro-vae train`` options; options given on the command line win.

    Args:
        description: One line: what the recipe follows.
        settings: Option destinations (``latent_dim``, ``kl_warmup``, ...) and their values,
            as the parser would store them.
    """

    description: str
    settings: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> list[str]:
        """The same settings as command-line words, e.g. ``["--latent-dim", "50", ...]``."""
        words: list[str] = []
        for key, value in self.settings.items():
            flag = "--" + key.replace("_", "-")
            if key.endswith("_option"):
                for name, option in value:
                    words += [flag, f"{name}={json.dumps(option)}"]
            elif isinstance(value, tuple):
                words += [flag, ",".join(str(v) for v in value)]
            else:
                words += [flag, str(value)]
        return words


_LONG_RUN = {"batch_size": 100, "kl_warmup": 100, "patience": 50}
#: The schedule of the measured MLP and gated runs (BENCHMARKS.md): 30 warm-up epochs.
_DECAYING = {
    "epochs": 1000,
    "lr": 1e-3,
    "lr_schedule": "exponential",
    "lr_gamma": 0.995,
    "lr_min": 1e-5,
    **_LONG_RUN,
    "kl_warmup": 30,
}
#: The gated 300-300 networks with 40 latents of the measured gated runs.
_GATED = {"arch": "gated", "latent_dim": 40, "hidden_dims": (300, 300), **_DECAYING}
#: The same networks and schedule for a hierarchy (the layer sizes come with each preset).
_GATED_LAYERS = {key: value for key, value in _GATED.items() if key != "latent_dim"}

#: The VampPrior paper's HVAE: two layers of 40, q(z_2|x) q(z_1|x, z_2), p(x|z_1, z_2).
_HVAE = {
    **_GATED_LAYERS,
    "latent_dims": (40, 40),
    "guide": "diagonal",
    "inference": "top-down",
    "decoder_input": "all",
}
#: The same with a VampPrior of 100 pseudo-inputs on z_2 (gradient clip as ``mnist-vamp``).
_HVAE_VAMP = {
    **_HVAE,
    "prior": "vamp",
    "prior_option": [("num_components", 100)],
    "clip_norm": 2e7,
}

#: Every preset, by name. No preset sets ``--data``: the user names the data file.
PRESETS: dict[str, Preset] = {
    "mnist-mlp": Preset(
        "MLP VAE, 50 latents, KL warm-up and exponential lr decay",
        {
            "latent_dim": 50,
            "hidden_dims": (400, 400),
            **_DECAYING,
        },
    ),
    "mnist-gated": Preset(
        "gated 300-300 networks, 40 latents, KL warm-up and exponential lr decay",
        _GATED,
    ),
    "mnist-iwae": Preset(
        "IWAE bound with K = 50, a 200-200 MLP and a diagonal posterior, after Burda et al. "
        "(2016)",
        {
            "guide": "diagonal",
            "objective": "iwae",
            "num_particles": 50,
            "latent_dim": 50,
            "hidden_dims": (200, 200),
            "batch_size": 20,
            "epochs": 3280,
            "lr": 1e-3,
            "lr_schedule": "exponential",
            "lr_gamma": 0.9993,
            "lr_min": 1e-4,
        },
    ),
    "mnist-vamp": Preset(
        "mnist-gated with a VampPrior of 100 pseudo-inputs (Tomczak & Welling, 2018)",
        {
            **_GATED,
            "prior": "vamp",
            "prior_option": [("num_components", 100)],
            # beta = 0 in epoch 1 lets q(z|x) and with it the mixture narrow; epoch 2 then
            # meets losses of ~1e6 nats per image whose gradients would swamp Adam's moments
            "clip_norm": 2e7,
        },
    ),
    "mnist-hvae": Preset(
        "two stochastic layers of 40 as in the VampPrior paper's HVAE (top-down posterior, "
        "decoder reading both layers), gated 300-300 networks",
        _HVAE,
    ),
    "mnist-hvae-vamp": Preset(
        "mnist-hvae with a VampPrior of 100 pseudo-inputs on the top layer",
        _HVAE_VAMP,
    ),
    "mnist-hvae-vamp-long": Preset(
        "mnist-hvae-vamp with the VampPrior paper's schedule: 500 pseudo-inputs, 100-epoch "
        "KL warm-up, constant lr 5e-4",
        {
            **_HVAE_VAMP,
            "prior_option": [("num_components", 500)],
            "kl_warmup": 100,
            "lr": 5e-4,
            "lr_schedule": "constant",
        },
    ),
    "mnist-ladder": Preset(
        "ladder VAE, three layers of 32, gated 300-300 networks, free bits 0.5 per layer",
        {
            **_GATED_LAYERS,
            "latent_dims": (32, 32, 32),
            "guide": "diagonal",
            "inference": "ladder",
            "free_bits": 0.5,
        },
    ),
    "mnist-conv-flow": Preset(
        "convolutional networks and an 8-map IAF posterior, cosine lr decay",
        {
            "arch": "conv",
            "guide": "iaf",
            "num_flows": 8,
            "latent_dim": 32,
            "hidden_dims": (400,),
            "epochs": 1000,
            "lr": 1e-3,
            "lr_schedule": "cosine",
            "lr_min": 1e-5,
            **_LONG_RUN,
        },
    ),
}
