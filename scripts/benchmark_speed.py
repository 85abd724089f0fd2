"""Time pyro_vae's training epoch against plain PyTorch twins of the same network and objective.

All variants run in one process and alternate within every repeat, so machine load hits them
alike; the table gives median seconds per epoch and the ratio to the plain twin and to the
textbook VAE (variant ``textbook``, diagonal guide only: the same widths written as the
usual PyTorch example, analytic KL, BCE with logits and a default ``torch.optim.Adam``).
Variants ``stl`` (compiled), ``stl-eager``, ``iwae`` and ``dreg`` time the other objectives and
gradient estimators.

    python scripts/benchmark_speed.py --data binarized-mnist PATH.npz --latent-dim 50 \
        --hidden-dims 400 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn

from pyro_vae import GUIDES, VAE, VAEConfig
from pyro_vae.cli import data_spec
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.guides import MIN_SCALE, make_guide
from pyro_vae.networks import MLP
from pyro_vae.train import TrainConfig, make_optimizer, train_epoch

#: pyro_vae's own variants are fit()'s epoch under TrainConfig(jit=None) (``default``), True
#: (``jit``) and False (``eager``; ``local`` adds Pyro's module-local parameters)
VARIANTS = (
    "plain", "textbook", "default", "jit", "eager", "local", "svi", "stl", "stl-eager", "iwae",
    "dreg",
)  # fmt: skip
JIT_OF_VARIANT = {
    "default": None, "jit": True, "eager": False, "local": False, "svi": False,
    "stl-eager": False,
}  # fmt: skip
#: fit()'s epoch with another objective or gradient estimator (``stl`` compiled, ``stl-eager``
#: not); iwae and dreg draw ``--num-particles`` z per image
OBJECTIVE_OF_VARIANT = {
    "stl": ("elbo", "stl"),
    "stl-eager": ("elbo", "stl"),
    "iwae": ("iwae", "pathwise"),
    "dreg": ("iwae", "dreg"),
}
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- plain PyTorch twins


class PlainVAE(nn.Module):
    """The same MLPs as pyro_vae; ``loss`` is the same one-sample ELBO estimate, negated.

    Args:
        data_dim: P.
        latent_dim: D.
        hidden_dims: Encoder widths (decoder reversed).
        guide: ``diagonal``, ``full`` (scaled Algorithm 2) or ``lowrank``.
        options: The guide's options (``tril_scale``, ``rank``, ``factor_scale``).
    """

    def __init__(
        self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int], guide: str, **options
    ) -> None:
        super().__init__()
        self.guide, self.latent_dim = guide, latent_dim
        self.trunk = MLP(data_dim, hidden_dims[:-1], hidden_dims[-1], final_activation=True)
        self.loc = nn.Linear(hidden_dims[-1], latent_dim)
        self.raw_scale = nn.Linear(hidden_dims[-1], latent_dim)
        self.decoder = MLP(latent_dim, tuple(reversed(hidden_dims)), data_dim)
        if guide == "full":
            self.tril_scale = options.get("tril_scale", 1.5 / latent_dim)
            self.register_buffer("mask", torch.ones(latent_dim, latent_dim).tril(-1).bool())
            self.head = nn.Linear(hidden_dims[-1], latent_dim * (latent_dim - 1) // 2)
        elif guide == "lowrank":
            self.rank = options.get("rank", 8)
            self.factor_scale = options.get("factor_scale", 0.1)
            self.head = nn.Linear(hidden_dims[-1], latent_dim * self.rank)

    def sample_and_log_q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z ``(B, D)`` from q(z|x) and log q(z|x) ``(B,)``."""
        h = self.trunk(x)
        loc, scale = self.loc(h), F.softplus(self.raw_scale(h)) + MIN_SCALE
        if self.guide == "lowrank":
            w = self.head(h).unflatten(-1, (self.latent_dim, self.rank))
            q = torch.distributions.LowRankMultivariateNormal(
                loc, (self.factor_scale * scale).unsqueeze(-1) * w, scale.square()
            )
            z = q.rsample()
            return z, q.log_prob(z)
        eps = torch.randn_like(loc)
        if self.guide == "full":
            strict = h.new_zeros(x.shape[0], self.latent_dim, self.latent_dim)
            strict[:, self.mask] = self.head(h)
            eps_mixed = eps + self.tril_scale * (strict @ eps.unsqueeze(-1)).squeeze(-1)
            z = loc + scale * eps_mixed  # L eps with L = diag(scale) (I + c strict)
        else:
            z = loc + scale * eps
        log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - scale.log().sum(-1)
        return z, log_q

    def loss(self, x: Tensor, num_data: int) -> Tensor:
        """-(N / B) sum_b [log p(x_b|z_b) + log p(z_b) - log q(z_b|x_b)]."""
        z, log_q = self.sample_and_log_q(x)
        log_lik = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none")
        log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
        return -(num_data / x.shape[0]) * (log_lik.sum(-1) + log_prior - log_q).sum()


class TextbookVAE(nn.Module):
    """The VAE as PyTorch examples write it, independent of pyro_vae's code: softplus MLPs of
    the same widths, a diagonal Gaussian q, the analytic KL to N(0, I), Bernoulli logits.

    ``loss`` is -(N / B) sum_b [ -BCE(x_b, logits(z_b)) - KL(q(z|x_b) || N(0, I)) ].
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = data_dim
        for size in hidden_dims:
            layers += [nn.Linear(width, size), nn.Softplus()]
            width = size
        self.encoder = nn.Sequential(*layers)
        self.mu = nn.Linear(width, latent_dim)
        self.raw_sigma = nn.Linear(width, latent_dim)
        layers, width = [], latent_dim
        for size in reversed(hidden_dims):
            layers += [nn.Linear(width, size), nn.Softplus()]
            width = size
        self.decoder = nn.Sequential(*layers, nn.Linear(width, data_dim))

    def loss(self, x: Tensor, num_data: int) -> Tensor:
        h = self.encoder(x)
        mu, sigma = self.mu(h), F.softplus(self.raw_sigma(h)) + MIN_SCALE
        z = mu + sigma * torch.randn_like(mu)
        bce = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (mu.square() + sigma.square() - 1.0 - 2.0 * sigma.log()).sum()
        return (num_data / x.shape[0]) * (bce + kl)


def textbook_epoch(model: TextbookVAE, data: Dataset, config: TrainConfig) -> Callable[[], None]:
    """The textbook loop: shuffled minibatches, ``torch.optim.Adam`` with its defaults."""
    return plain_epoch(model, data, config, torch.optim.Adam(model.parameters(), lr=config.lr))


class PlainFlowVAE(nn.Module):
    """IAF, planar or radial flow posterior written out in plain torch, around the same networks.

    The trunk, the Gaussian heads, each map's network (MADE or parameter MLP) and the decoder
    are taken from a pyro_vae guide and decoder (plain ``nn.Module``s), so the twin has the
    same weights and the same cost per network pass; the maps, their log-determinants,
    the order reversal between autoregressive maps and the objective are written here
    without Pyro's transforms or ``TransformedDistribution``.

    Args:
        encoder: A pyro_vae ``IAFGuide``, ``PlanarGuide`` or ``RadialGuide`` (only its
            submodules are used).
        decoder: The decoder network ``(*, D) -> (*, P)``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.step = {"iaf": self._iaf, "planar": self._planar, "radial": self._radial}[encoder.key]
        self.encoder, self.decoder = encoder, decoder
        self.margin = getattr(encoder.flows[0], "margin", 1e-4)

    def _iaf(self, k: int, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One stable IAF map: z' = s z + (1 - s) m, log|det| = sum log s."""
        if k > 0:
            z = z.flip(-1)  # the order reversal between maps
        mean, logit = self.encoder.flows[k].nn(z, context=h)
        logit = logit + 2.0  # Kingma et al.'s forget-gate bias
        scale = torch.sigmoid(logit)
        return scale * z + (1 - scale) * mean, F.logsigmoid(logit).sum(-1)

    def _planar(self, k: int, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One planar map z' = z + u_hat tanh(w.z + b) with w.u_hat = softplus(w.u) - 1 + d."""
        bias, u, w = self.encoder.flows[k].nn(h)
        wu = (w * u).sum(-1, keepdim=True)
        one_plus = F.softplus(wu) + self.margin  # 1 + w.u_hat
        u_hat = u + (one_plus - 1 - wu) * w / w.square().sum(-1, keepdim=True)
        act = torch.tanh((w * z).sum(-1, keepdim=True) + bias)
        square = act.square()
        log_det = torch.log(square + (1 - square) * one_plus).squeeze(-1)
        return z + u_hat * act, log_det

    def _radial(self, k: int, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One radial map z' = z + beta h(r) (z - z0), h = 1 / (alpha + r), beta > -alpha."""
        z0, alpha_raw, beta_raw = self.encoder.flows[k].nn(h)
        alpha = F.softplus(alpha_raw)
        beta = F.softplus(beta_raw) - alpha
        diff = z - z0
        r = diff.norm(dim=-1, keepdim=True)
        beta_h = beta / (alpha + r)
        log_det = (z.shape[-1] - 1) * torch.log1p(beta_h) + torch.log1p(
            beta_h - beta * r / (alpha + r).square()
        )
        return z + beta_h * diff, log_det.squeeze(-1)

    def sample_and_log_q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z ``(B, D)`` from q(z|x) and log q(z|x) ``(B,)``."""
        h = self.encoder.trunk(x)
        loc = self.encoder.loc(h)
        scale = F.softplus(self.encoder.raw_scale(h)) + MIN_SCALE
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - scale.log().sum(-1)
        for k in range(len(self.encoder.flows)):
            z, log_det = self.step(k, z, h)
            log_q = log_q - log_det
        return z, log_q

    loss = PlainVAE.loss


PLAIN_TWINS = ("diagonal", "full", "lowrank", "iaf", "planar", "radial")


def plain_twin(
    data_dim: int, latent_dim: int, hidden_dims: Sequence[int], guide: str
) -> nn.Module:
    """The plain PyTorch twin of pyro_vae's ``guide`` with fresh weights."""
    if guide in ("iaf", "planar", "radial"):
        encoder = make_guide(guide, data_dim, latent_dim, hidden_dims)
        return PlainFlowVAE(encoder, MLP(latent_dim, tuple(reversed(hidden_dims)), data_dim))
    return PlainVAE(data_dim, latent_dim, hidden_dims, guide)


# ---------------------------------------------------------------- one epoch of each variant


def plain_epoch(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:
    """A plain PyTorch epoch of ``model.loss``; Adam as fit makes it unless ``optimizer``."""
    if optimizer is None:
        optimizer = make_optimizer(model.parameters(), config.lr, data.train.device)
    generator = torch.Generator().manual_seed(config.seed)

    def run() -> None:
        num_data = data.num_train
        total = torch.zeros((), device=data.train.device)
        order = torch.randperm(num_data, generator=generator).to(data.train.device)
        for index in order.split(config.batch_size):
            x = data.train_batch(index)
            loss = model.loss(x, num_data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        float(total)  # one sync, like fit

    return run


def pyro_vae_epoch(vae: VAE, data: Dataset, config: TrainConfig) -> Callable[[], None]:
    """Exactly fit()'s epoch: ELBOLoss, fused Adam, losses accumulated on the device."""
    from pyro_vae.distributed import ELBOLoss
    from pyro_vae.train import make_loss

    loss_fn = ELBOLoss(vae, make_loss(config, vae))
    optimizer = make_optimizer(vae.parameters(), config.lr, data.train.device)
    generator = torch.Generator().manual_seed(config.seed)
    epoch = iter(range(1, 10**9))

    def run() -> None:
        with pyro.validation_enabled(config.validate):  # as fit() runs it
            train_epoch(vae, data, loss_fn, optimizer, config, generator, next(epoch))

    return run


def svi_epoch(vae: VAE, data: Dataset, config: TrainConfig) -> Callable[[], None]:
    """Pyro used the way its own VAE example does: SVI.step with pyro.optim.Adam."""
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": config.lr}), Trace_ELBO())
    generator = torch.Generator().manual_seed(config.seed)

    def run() -> None:
        num_data = data.num_train
        order = torch.randperm(num_data, generator=generator).to(data.train.device)
        for index in order.split(config.batch_size):
            svi.step(data.train_batch(index), num_data=num_data)

    return run


# ---------------------------------------------------------------- driver


def build(
    variant: str, guide: str, data: Dataset, args: argparse.Namespace, device: torch.device
) -> Callable[[], None] | None:
    config = TrainConfig(batch_size=args.batch_size, jit=JIT_OF_VARIANT.get(variant))
    if variant in OBJECTIVE_OF_VARIANT:
        objective, estimator = OBJECTIVE_OF_VARIANT[variant]
        k = args.num_particles if objective == "iwae" else 1
        config = replace(
            config, objective=objective, gradient_estimator=estimator, num_particles=k
        )
    if variant == "textbook":
        if guide != "diagonal":
            return None
        model = TextbookVAE(data.data_dim, args.latent_dim, args.hidden_dims).to(device)
        return textbook_epoch(model, data, config)
    if variant == "plain":
        if guide not in PLAIN_TWINS:
            return None
        twin = plain_twin(data.data_dim, args.latent_dim, args.hidden_dims, guide)
        return plain_epoch(twin.to(device), data, config)
    with pyro.settings.context(module_local_params=variant == "local"):
        vae = VAE(VAEConfig(data.data_dim, args.latent_dim, args.hidden_dims, guide)).to(device)
    if variant == "svi":
        return svi_epoch(vae, data, config)
    run = pyro_vae_epoch(vae, data, config)
    if variant != "local":
        return run

    def run_local() -> None:
        with pyro.settings.context(module_local_params=True):
            run()

    return run_local


def time_call(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def benchmark(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], int]:
    data = load_dataset(data_spec(args.data, None)).to(device)
    if args.steps is not None:
        data = data.first_train(args.steps * args.batch_size)
    runs = {}
    for guide in args.guides:
        for variant in args.variants:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            run = build(variant, guide, data, args, device)
            if run is not None:
                run()  # warm-up (and JIT compilation)
                runs[guide, variant] = run
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for repeat in range(args.repeats):
        for key, run in runs.items():  # alternate: every variant once per repeat
            times[key].append(time_call(run, device))
        print(f"# {device.type}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    steps = math.ceil(data.num_train / args.batch_size)
    rows = []
    for (guide, variant), values in times.items():
        median = statistics.median(values)
        plain = times.get((guide, "plain"))
        ratio = median / statistics.median(plain) if plain else None
        textbook = times.get(("diagonal", "textbook"))
        to_textbook = median / statistics.median(textbook) if textbook else None
        rows.append(
            {
                "device": device.type,
                "guide": guide,
                "variant": variant,
                "median_s": median,
                "ms_per_step": 1000 * median / steps,
                "ratio": ratio,
                "to_textbook": to_textbook,
                "spread": (min(values), max(values)),
            }
        )
    return rows, steps


def markdown(rows: list[dict], steps: int) -> str:
    lines = [
        f"| device | guide | variant | median s per {steps} steps | ms / step | × plain twin "
        "| × textbook VAE | min-max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        textbook = "n/a" if r.get("to_textbook") is None else f"{r['to_textbook']:.2f}"
        lines.append(
            f"| {r['device']} | {r['guide']} | {r['variant']} | {r['median_s']:.3f} "
            f"| {r['ms_per_step']:.2f} | {ratio} | {textbook} "
            f"| {r['spread'][0]:.3f}-{r['spread'][1]:.3f} |"
        )
    return "\n".join(lines)


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits"], help="NAME [PATH] or FILE.npz")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (epoch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden-dims", type=_widths, default=(400,), help="e.g. 400 or 400,200")
    parser.add_argument("--guides", nargs="+", default=sorted(GUIDES), choices=sorted(GUIDES))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "textbook", "default", "jit", "eager"],
        choices=VARIANTS,
    )
    parser.add_argument("--num-particles", type=int, default=50, help="K of iwae and dreg")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu and cuda if any")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} threads")
    for name in devices:
        rows, steps = benchmark(args, torch.device(name))
        print(markdown(rows, steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
