"""MLP building blocks: every network maps the last dim and accepts any leading shape."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP", "Decoder", "check_hidden_dims"]


def check_hidden_dims(hidden_dims: Sequence[int]) -> tuple[int, ...]:
    """Validate layer widths and return them as a tuple."""
    dims = tuple(hidden_dims)
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"hidden_dims must be one or more positive integers, got {hidden_dims!r}")
    return dims


class MLP(nn.Sequential):
    """Linear layers with softplus between them: ``(*, in_dim) -> (*, out_dim)``.

    Args:
        in_dim: Input features.
        hidden_dims: Widths of the hidden layers (may be empty).
        out_dim: Output features.
        final_activation: Apply softplus after the last layer too (for trunks).
    """

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, final_activation: bool = False
    ) -> None:
        dims = (in_dim, *hidden_dims, out_dim)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2 or final_activation:
                layers.append(nn.Softplus())
        super().__init__(*layers)


class Decoder(nn.Module):
    """Bernoulli logits of the pixels given z: ``(*, D) -> (*, P)``.

    Args:
        latent_dim: Latent size D.
        hidden_dims: Hidden widths, from z to pixels.
        data_dim: Number of pixels P.
    """

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], data_dim: int) -> None:
        super().__init__()
        self.net = MLP(latent_dim, check_hidden_dims(hidden_dims), data_dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
