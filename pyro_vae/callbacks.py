"""Watching a training run: the callback protocol of ``fit`` and a TensorBoard logger."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Callback", "TensorBoardCallback"]


class Callback:
    """Hooks that ``fit(..., callbacks=[...])`` calls on the process that writes the run.

    Subclass and override what you need; every hook here does nothing.

    - ``on_fit_start(vae, steps_per_epoch)``: once, before the first epoch trains.
    - ``on_step(epoch, step, running_elbo)``: every ``TrainConfig.log_every`` steps, after the
      divergence check; ``running_elbo`` is the epoch's mean objective per image so far.
    - ``on_epoch_end(epoch, row, vae)``: after each epoch is recorded; ``row`` is its
      ``metrics.csv`` row (``train_elbo``, ``valid_elbo``, ``seconds``, ``kl_weight``, ``lr``;
      ``valid_bound`` when training with the IWAE bound).
    - ``on_fit_end(history)``: once, with every epoch's row, also after early stopping.
    """

    def on_fit_start(self, vae: Any, steps_per_epoch: int) -> None:  # noqa: ANN401
        """Before the first epoch."""

    def on_step(self, epoch: int, step: int, running_elbo: float) -> None:
        """Every ``log_every`` steps."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any], vae: Any) -> None:  # noqa: ANN401
        """After each recorded epoch."""

    def on_fit_end(self, history: Sequence[dict[str, Any]]) -> None:
        """After the last epoch."""


class TensorBoardCallback(Callback):
    """Writes scalars and sample images to TensorBoard event files in ``log_dir``.

    Per epoch: ``elbo/train``, ``elbo/valid``, ``kl/valid`` (KL(q(z|x) || p(z)) on ``valid``,
    one draw), ``kl_weight`` and ``lr`` when they vary, ``seconds``, and ``samples`` (16 images
    decoded from the prior, the same draws every epoch). Every ``log_every`` steps:
    ``elbo/train_running``. Needs the ``tensorboard`` package (``pip install
    'pyro-vae[tensorboard]'``).

    Args:
        log_dir: Folder of the event files.
        valid: Images ``(N, P)`` whose KL term is logged (the first 100 are used); None: no KL.
        num_images: Samples drawn per epoch.
    """

    def __init__(
        self, log_dir: str | Path, valid: Tensor | None = None, num_images: int = 16
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'pyro-vae[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.valid = None if valid is None else valid[:100]
        self.num_images, self.steps_per_epoch = num_images, 1

    def on_fit_start(self, vae: Any, steps_per_epoch: int) -> None:  # noqa: ANN401
        self.steps_per_epoch = steps_per_epoch

    def on_step(self, epoch: int, step: int, running_elbo: float) -> None:
        global_step = (epoch - 1) * self.steps_per_epoch + step
        self.writer.add_scalar("elbo/train_running", running_elbo, global_step)

    def on_epoch_end(self, epoch: int, row: dict[str, Any], vae: Any) -> None:  # noqa: ANN401
        self.writer.add_scalar("elbo/train", row["train_elbo"], epoch)
        self.writer.add_scalar("elbo/valid", row["valid_elbo"], epoch)
        self.writer.add_scalar("seconds", row["seconds"], epoch)
        for key, tag in (("valid_bound", "iwae/valid"), ("kl_weight", "kl_weight"), ("lr", "lr")):
            if key in row:
                self.writer.add_scalar(tag, row[key], epoch)
        if self.valid is not None and not vae.config.condition_dim:
            self.writer.add_scalar("kl/valid", _kl(vae, self.valid), epoch)
        self.writer.add_images("samples", _sample_images(vae, self.num_images), epoch)
        self.writer.flush()

    def on_fit_end(self, history: Sequence[dict[str, Any]]) -> None:
        self.writer.close()


@torch.no_grad()
def _kl(vae: Any, x: Tensor) -> float:  # noqa: ANN401
    from .evaluate import log_weights

    was_training = vae.training
    vae.eval()
    try:
        weights = log_weights(vae, x.to(vae.prior_loc.device), 1)
    finally:
        vae.train(was_training)
    return float((weights["log_q"] - weights["log_prior"]).mean())


def _sample_images(vae: Any, num_images: int) -> Tensor:  # noqa: ANN401
    """``(n, 1, H, W)`` prior samples' means scaled to [0, 1] on the likelihood's range."""
    generator = torch.Generator().manual_seed(0)
    images = vae.sample_images(num_images, generator, vae.class_cycle(num_images)).float().cpu()
    low, high = vae.likelihood.value_range() or (float(images.min()), float(images.max()))
    images = ((images - low) / max(high - low, 1e-12)).clamp(0, 1)
    return images.reshape(num_images, 1, *vae.config.image_shape)
