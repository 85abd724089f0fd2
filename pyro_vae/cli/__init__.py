"""The pyro-vae command line: train, evaluate, sample, compare, gaps, show, latent, export."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..checkpoint import CheckpointError
from ..data import DataError
from ..distributed import finish_worker
from .arguments import UsageError, _parse, build_parser
from .commands import (
    cmd_compare,
    cmd_evaluate,
    cmd_export,
    cmd_gaps,
    cmd_latent,
    cmd_sample,
    cmd_show,
)
from .common import _one_line, data_spec, guide_options, resolve_device
from .train_command import cmd_train

__all__ = [
    "UsageError",
    "build_parser",
    "data_spec",
    "guide_options",
    "main",
    "resolve_device",
]

COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
    "compare": cmd_compare,
    "gaps": cmd_gaps,
    "show": cmd_show,
    "latent": cmd_latent,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input).

    A ``torchrun`` worker leaves its process group and exits here instead of returning.
    """
    return finish_worker(_run(argv))


def _run(argv: Sequence[str] | None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _parse(argv)
        args.argv = argv
        return COMMANDS[args.command](args)
    except (UsageError, DataError, CheckpointError, ValueError, OSError) as error:
        # ValueError: invalid settings caught by the library's constructors
        print(f"pyro-vae: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
