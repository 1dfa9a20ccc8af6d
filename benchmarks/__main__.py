"""``python -m benchmarks NAME [flags]``: every benchmark that has ``register(subparsers)``, by name."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).parent
# A new benchmark is one new module with register(): found by reading the sources, so --help is quick.
NAMES = sorted(p.stem for p in HERE.glob("[!_]*.py") if "\ndef register(" in p.read_text(encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in NAMES:
        importlib.import_module(f"benchmarks.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
