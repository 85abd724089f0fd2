"""Semi-supervised VAE (Kingma et al. 2014, M2) on digits with 10% of the labels.

The generative model p(y) p(z) p(x | y, z) and the guide q(y | x) q(z | x, y) are built from
pyro_vae parts: q(z | x, y) is any registered guide family (``make_guide``) fed with
[x, onehot(y)], p(x | y, z) is pyro_vae's ``Decoder`` fed with [z, onehot(y)], and q(y | x) is
an ``MLP``. The label site is discrete: on unlabeled images ``TraceEnum_ELBO`` sums it out
exactly (parallel enumeration); on labeled images it is observed and the model also scores
alpha * log q(y | x) (site ``m2.labeled.y_aux``), the classification term of Kingma et al.
One ``SVI`` with ``TraceEnum_ELBO`` trains everything; each step takes a batch of unlabeled
images and a few labeled ones. Reports the test accuracy of q(y | x), and that of the same
classifier trained on the labeled images alone for comparison.

References:
    Semi-Supervised Learning with Deep Generative Models (Kingma et al., 2014)

Example::

    python scripts/semi_supervised.py --epochs 50
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.nn import PyroModule, pyro_method
from torch import Tensor

from pyro_vae import make_guide
from pyro_vae.networks import MLP, Decoder


def concat(a: Tensor, b: Tensor) -> Tensor:
    """[a, b] along the last dim after broadcasting the leading dims (enumeration adds some)."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])], dim=-1)


class M2(PyroModule):
    """p(y) p(z) p(x|y,z) with guide q(y|x) q(z|x,y), for unlabeled and labeled images.

    Sites ``m2.{part}.y``, ``m2.{part}.z``, ``m2.{part}.x`` in plate ``m2.{part}``, with part
    ``unlabeled`` or ``labeled``; ``m2.labeled.y_aux`` is the classification term.

    Args:
        data_dim: Pixels P.
        num_classes: Classes K.
        latent_dim: Latent size D.
        hidden_dims: Widths of the encoder, classifier and (reversed) decoder.
        guide: Registered guide family of q(z | x, y).
        alpha: Weight of the classification term on labeled images.
    """

    def __init__(
        self,
        data_dim: int,
        num_classes: int,
        latent_dim: int = 8,
        hidden_dims: Sequence[int] = (256,),
        guide: str = "diagonal",
        alpha: float = 50.0,
    ) -> None:
        super().__init__("m2")
        self.num_classes, self.latent_dim, self.alpha = num_classes, latent_dim, alpha
        self.classifier = MLP(data_dim, hidden_dims, num_classes)
        self.encoder = make_guide(guide, data_dim + num_classes, latent_dim, hidden_dims)
        self.decoder = Decoder(latent_dim + num_classes, tuple(reversed(hidden_dims)), data_dim)

    def _plate(self, part: str, x: Tensor, num_data: int | None) -> pyro.plate:
        n = x.shape[0]
        return pyro.plate(f"m2.{part}", num_data or n, subsample=torch.arange(n), dim=-1)

    @pyro_method
    def model(
        self, x: Tensor, x_labeled: Tensor, y_labeled: Tensor, num_data: tuple[int, int]
    ) -> None:
        """Unlabeled images x ``(B, P)`` and labeled ones with labels ``(L,)``.

        ``num_data`` = (unlabeled, labeled) dataset sizes scale the two minibatch terms.
        """
        self._model_part("unlabeled", x, None, num_data[0])
        self._model_part("labeled", x_labeled, y_labeled, num_data[1])

    @pyro_method
    def guide(
        self, x: Tensor, x_labeled: Tensor, y_labeled: Tensor, num_data: tuple[int, int]
    ) -> None:
        self._guide_part("unlabeled", x, None, num_data[0])
        self._guide_part("labeled", x_labeled, y_labeled, num_data[1])

    def _model_part(self, part: str, x: Tensor, y: Tensor | None, num_data: int) -> None:
        prior_y = dist.Categorical(logits=x.new_zeros(self.num_classes))
        prior_z = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
        with self._plate(part, x, num_data):
            if y is not None:  # labeled: the extra term alpha * log q(y|x) of Kingma et al.
                with pyro.poutine.scale(scale=self.alpha):
                    q_y = dist.Categorical(logits=self.classifier(x))
                    pyro.sample(f"m2.{part}.y_aux", q_y, obs=y)
            y = pyro.sample(f"m2.{part}.y", prior_y, obs=y)  # enumerated when unobserved
            z = pyro.sample(f"m2.{part}.z", prior_z)
            logits = self.decoder(concat(z, F.one_hot(y, self.num_classes).to(z)))
            pyro.sample(f"m2.{part}.x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def _guide_part(self, part: str, x: Tensor, y: Tensor | None, num_data: int) -> None:
        with self._plate(part, x, num_data):
            if y is None:
                q_y = dist.Categorical(logits=self.classifier(x))
                y = pyro.sample(f"m2.{part}.y", q_y, infer={"enumerate": "parallel"})  # (K, 1)
            onehot = F.one_hot(y, self.num_classes).to(x)
            pyro.sample(f"m2.{part}.z", self.encoder(concat(x, onehot)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Most probable class under q(y | x), ``(B,)``."""
        return self.classifier(x).argmax(-1)


def load_digits_with_labels(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 8x8 digits thresholded at 0.5: train x ``(1497, 64)``, y, test x (300), y."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0 >= 0.5, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:300], order[300:]
    return x[train], y[train], x[test], y[test]


def train_baseline(x: Tensor, y: Tensor, hidden_dims: Sequence[int], epochs: int) -> MLP:
    """The same classifier trained on the labeled images only (cross-entropy, full batch)."""
    net = MLP(x.shape[1], hidden_dims, int(y.max()) + 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs * 10):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def run(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    labeled_fraction: float = 0.1,
    epochs: int = 50,
    batch_size: int = 100,
    lr: float = 1e-3,
    guide: str = "diagonal",
    seed: int = 0,
) -> dict[str, float | int]:
    """Train M2 with ``labeled_fraction`` of the labels; returns test accuracies and sizes."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    order = torch.randperm(len(x_train))
    num_labeled = max(1, round(labeled_fraction * len(x_train)))
    lab, unl = order[:num_labeled], order[num_labeled:]
    m2 = M2(x_train.shape[1], num_classes, guide=guide)
    svi = SVI(m2.model, m2.guide, pyro.optim.Adam({"lr": lr}), TraceEnum_ELBO(max_plate_nesting=1))
    start = time.perf_counter()
    sizes = (len(unl), len(lab))
    for _ in range(epochs):
        for index in unl[torch.randperm(len(unl))].split(batch_size):
            labeled = lab[torch.randint(len(lab), (max(1, batch_size // 4),))]
            svi.step(x_train[index], x_train[labeled], y_train[labeled], sizes)
    seconds = time.perf_counter() - start
    baseline = train_baseline(x_train[lab], y_train[lab], (256,), epochs)
    with torch.no_grad():
        baseline_accuracy = float((baseline(x_test).argmax(-1) == y_test).float().mean())
    return {
        "test_accuracy": float((m2.predict(x_test) == y_test).float().mean()),
        "labeled_only_accuracy": baseline_accuracy,
        "num_labeled": num_labeled,
        "num_unlabeled": len(unl),
        "num_test": len(x_test),
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeled-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--guide", default="diagonal")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_with_labels()
    result = run(
        x_train,
        y_train,
        x_test,
        y_test,
        args.labeled_fraction,
        args.epochs,
        guide=args.guide,
        seed=args.seed,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
