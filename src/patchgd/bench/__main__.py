"""``python -m patchgd.bench <name> ...``: the benchmarks without the ``patchgd`` command."""

from __future__ import annotations

import argparse
import sys

from . import parse_with_benchmarks, register_all


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m patchgd.bench``: one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog="python -m patchgd.bench", description=__doc__)
    register_all(parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_with_benchmarks(build_parser(), argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
