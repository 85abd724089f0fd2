"""Semi-supervised VAE (Kingma et al. 2014, M2) on digits with 10% of the labels.

The generative model p(y) p(z) p(x | y, z) and the guide q(y | x) q(z | x, y): p(z) p(x | z, y)
and q(z | x, y) are one conditional ``VAE`` (``condition_dim`` = number of classes, fed the
one-hot label), and q(y | x) is an ``MLP`` classifier. The label site ``m2.y`` is sampled
inside the VAE's own data plate (``vae.plate``), so y, z and x share one plate ``m2.data``.
On unlabeled images ``TraceEnum_ELBO`` sums y out exactly (parallel enumeration); on labeled
images y is observed and the model also scores alpha * log q(y | x) (site ``m2.y_aux``), the
classification term of Kingma et al. Each step takes a batch of unlabeled images
(``TraceEnum_ELBO``), then a few labeled ones (``Trace_ELBO``: nothing to enumerate), two
``SVI`` steps with one shared Adam, as in Pyro's ss-vae example. Reports the test accuracy of
q(y | x), and that of the same classifier trained on the labeled images alone for comparison.

Data: the built-in digits (``load_dataset(DataSpec("digits"))``, pixels thresholded at 0.5);
its train and validation splits together (1,497 images) are the training images, its 300
test images the test set.

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
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.nn import PyroModule, pyro_method
from torch import Tensor

from pyro_vae import VAE, DataSpec, VAEConfig, load_dataset
from pyro_vae.networks import MLP


class M2(PyroModule):
    """p(y) p(z) p(x | y, z) with guide q(y | x) q(z | x, y).

    Sites ``m2.y``, ``m2.z``, ``m2.x`` (and ``m2.y_aux`` on labeled images, the classification
    term) in the plate ``m2.data``. Pass labels y ``(B,)`` for labeled images, None to
    enumerate them.

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
        self.num_classes, self.alpha = num_classes, alpha
        config = VAEConfig(
            data_dim, latent_dim, tuple(hidden_dims), guide, condition_dim=num_classes
        )
        self.vae = VAE(config, name="m2")
        self.classifier = MLP(data_dim, hidden_dims, num_classes)

    @pyro_method
    def model(self, x: Tensor, y: Tensor | None = None, num_data: int | None = None) -> None:
        prior_y = dist.Categorical(logits=x.new_zeros(self.num_classes))
        with self.vae.plate(x, num_data=num_data):
            if y is not None:  # labeled: the extra term alpha * log q(y|x) of Kingma et al.
                with pyro.poutine.scale(scale=self.alpha):
                    pyro.sample("m2.y_aux", dist.Categorical(logits=self.classifier(x)), obs=y)
            y = pyro.sample("m2.y", prior_y, obs=y)  # unobserved: enumerated, (K, 1)
            self.vae.model(x, condition=F.one_hot(y, self.num_classes).to(x))

    @pyro_method
    def guide(self, x: Tensor, y: Tensor | None = None, num_data: int | None = None) -> None:
        with self.vae.plate(x, num_data=num_data):
            if y is None:
                q_y = dist.Categorical(logits=self.classifier(x))
                y = pyro.sample("m2.y", q_y, infer={"enumerate": "parallel"})
            self.vae.guide(x, condition=F.one_hot(y, self.num_classes).to(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Most probable class under q(y | x), ``(B,)``."""
        return self.classifier(x).argmax(-1)


def load_digits_with_labels(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Built-in digits: train x ``(1497, 64)`` (train + valid splits), y, test x (300), y."""
    data = load_dataset(DataSpec("digits", seed=seed))
    x_train = torch.cat([data.split("train"), data.split("valid")])
    y_train = torch.cat([data.train_labels, data.valid_labels])
    return x_train, y_train, data.split("test"), data.test_labels


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
    alpha: float = 50.0,
    labeled_batch_size: int | None = None,
) -> dict[str, float | int]:
    """Train M2 with ``labeled_fraction`` of the labels; returns test accuracies and sizes.

    Each step: ``batch_size`` unlabeled images, then ``labeled_batch_size`` (default
    ``batch_size // 4``) labeled ones drawn with replacement.
    """
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    order = torch.randperm(len(x_train))
    num_labeled = max(1, round(labeled_fraction * len(x_train)))
    lab, unl = order[:num_labeled], order[num_labeled:]
    labeled_batch_size = labeled_batch_size or max(1, batch_size // 4)
    m2 = M2(x_train.shape[1], num_classes, guide=guide, alpha=alpha)
    optimizer = pyro.optim.Adam({"lr": lr})  # shared: one Adam state per parameter
    unlabeled_svi = SVI(m2.model, m2.guide, optimizer, TraceEnum_ELBO(max_plate_nesting=1))
    labeled_svi = SVI(m2.model, m2.guide, optimizer, Trace_ELBO())  # y observed: no enumeration
    start = time.perf_counter()
    for _ in range(epochs):
        for index in unl[torch.randperm(len(unl))].split(batch_size):
            unlabeled_svi.step(x_train[index], num_data=len(unl))
            labeled = lab[torch.randint(len(lab), (labeled_batch_size,))]
            labeled_svi.step(x_train[labeled], y_train[labeled], num_data=len(lab))
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
    parser.add_argument("--alpha", type=float, default=50.0)
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
        alpha=args.alpha,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
