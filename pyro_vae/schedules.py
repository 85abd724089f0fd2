"""Per-epoch training recipes: KL warm-up weight, learning-rate schedule, early stopping."""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "kl_weight", "learning_rate", "patience_exhausted"]

#: Names accepted by :func:`learning_rate` and ``TrainConfig.lr_schedule``.
LR_SCHEDULES = ("constant", "exponential", "cosine")


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    r"""The KL weight beta of ``epoch`` (from 1): linear from 0 to 1 over ``warmup_epochs``.

    .. math:: \beta_e = \min\Big(1, \frac{e - 1}{W}\Big)

    Epochs 1..W train with beta = 0, 1/W, ..., (W-1)/W; every later epoch with beta = 1.
    ``warmup_epochs = 0`` is off (beta = 1 throughout).
    """
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, (epoch - 1) / warmup_epochs)


def learning_rate(
    epoch: int,
    lr: float,
    schedule: str = "constant",
    num_epochs: int = 1,
    gamma: float = 1.0,
    lr_min: float = 0.0,
) -> float:
    r"""The learning rate of ``epoch`` (from 1), a closed form of the epoch.

    - ``constant``: :math:`\eta_e = \eta`
    - ``exponential``: :math:`\eta_e = \max(\eta_{min}, \eta\,\gamma^{e-1})`
    - ``cosine``: :math:`\eta_e = \eta_{min} + (\eta - \eta_{min})
      \frac{1 + \cos(\pi (e - 1) / E)}{2}`, E = ``num_epochs``

    Epoch 1 always uses ``lr``. Exponential and cosine give the values of torch's
    ``ExponentialLR`` and ``CosineAnnealingLR(T_max=num_epochs, eta_min=lr_min)`` stepped
    once per epoch; being a function of the epoch, a resumed run continues them exactly.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    step = epoch - 1
    if schedule == "exponential":
        return max(lr_min, lr * gamma**step)
    if schedule == "cosine":
        return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * step / num_epochs)) / 2
    return lr


def patience_exhausted(
    epoch: int, best_epoch: int, patience: int | None, warmup_epochs: int = 0
) -> bool:
    """Whether ``patience`` epochs have passed since the best validation value, the epoch
    ``best_epoch`` (None: never).

    Epochs of the KL warm-up do not count: during it the weighted objective and the
    validation ELBO may move apart, so counting starts after epoch ``warmup_epochs``.
    """
    return patience is not None and epoch - max(best_epoch, warmup_epochs) >= patience
