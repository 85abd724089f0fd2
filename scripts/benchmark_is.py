"""Peak memory and images per second of the importance-sampled log p(x) (K particles, chunked).

    python scripts/benchmark_is.py --data binarized-mnist PATH.npz --num-images 200 \
        --num-samples 5000 [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, VAEConfig, evaluate, load_checkpoint, load_dataset
from pyro_vae.cli import data_spec
from pyro_vae.evaluate import MAX_ELEMENTS
from pyro_vae.run_dir import RunDir


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident set size (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RSSMonitor(threading.Thread):
    """Samples the resident set size every ``interval`` seconds; ``peak`` is the largest."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, rss_mib(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, rss_mib())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits"], help="NAME [PATH] or FILE.npz")
    parser.add_argument("--run", type=Path, default=None, help="trained run folder (optional)")
    parser.add_argument("--guide", default="diagonal", help="guide of an untrained model")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-elements", type=int, default=MAX_ELEMENTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x = load_dataset(data_spec(args.data, None)).split("valid")[: args.num_images].clone()
    gc.collect()  # drop the other splits
    if args.run is not None:
        vae, _ = load_checkpoint(RunDir(args.run).checkpoint)
    else:
        vae = VAE(VAEConfig(x.shape[1], args.latent_dim, (400,), args.guide))
    before, monitor = rss_mib(), RSSMonitor()
    monitor.start()
    start = time.perf_counter()
    result = evaluate(
        vae, x, args.num_samples, batch_size=args.batch_size, max_elements=args.max_elements
    )
    seconds = time.perf_counter() - start
    monitor.done.set()
    monitor.join()
    print(f"# {' '.join(sys.argv)}")
    print(
        f"{x.shape[0]} images, K = {args.num_samples}, guide {vae.config.guide}: "
        f"IS log p(x) {result.log_likelihood:.2f}, ELBO {result.elbo:.2f} nats; "
        f"{seconds:.1f} s = {x.shape[0] / seconds:.2f} images/s; RSS {before:.0f} MiB before, "
        f"peak {monitor.peak:.0f} MiB while evaluating (process peak {peak_rss_mib():.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
