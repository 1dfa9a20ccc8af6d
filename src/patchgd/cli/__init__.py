"""The ``patchgd`` command: generate, prepare, extract, stats, inspect, configs, train, plan, sweep, cv, demo,
evaluate and predict (the benchmarks are the repository's ``benchmarks/``, not part of the command).

Only the standard library, PyYAML and the config schema are imported here; every command imports what
it needs (torch among it) when it runs, so that ``patchgd --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError
from . import data, training, use
from .common import PACKAGED_CONFIGS

__all__ = ["PACKAGED_CONFIGS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchgd", description=(
        "Train image classifiers end-to-end on very large images with Patch Gradient Descent "
        "(Gupta et al., TMLR 2024)."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (data, training, use):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every process prints its own error; the rank says which one failed first.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f"patchgd {args.command}" + (f" (rank {os.environ.get('RANK')} of {world})" if world > 1 else "")
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        # One line: an error from deep inside a library can span several (torch's safe-loader advice).
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{who}: error: {message}", file=sys.stderr)
        return 2

