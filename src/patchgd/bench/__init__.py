"""Speed and memory benchmarks, one module each, run as ``patchgd bench <name>`` or ``python -m patchgd.bench``.

Every public module of this package exposes ``register(subparsers)``, which adds its subcommand whose
``func`` prints a table and writes a JSON of the measurements; :func:`register_all` finds them all, so a
new benchmark is one new module.

Registration is lazy: building the command line reads only each module's docstring (for its one-line
help), so ``patchgd --help`` does not import torch. A benchmark's module is imported when it runs or its
own ``--help`` is asked for, and parses the arguments the command line passed on to it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
from pathlib import Path

__all__ = ["register_all"]


def _summary(name: str) -> str:
    """The first line of benchmark ``name``'s module docstring, read without importing the module."""
    source = (Path(__file__).parent / f"{name}.py").read_text(encoding="utf-8")
    return (ast.get_docstring(ast.parse(source)) or name).splitlines()[0].rstrip(".")


class _LazyBenchmark:
    """The ``func`` of a benchmark's placeholder subcommand: imports its module, parses, runs."""

    def __init__(self, name: str, prog: str) -> None:
        self.name, self.prog = name, prog

    def __call__(self, args: argparse.Namespace) -> int:
        module = importlib.import_module(f"{__name__}.{self.name}")
        parent = argparse.ArgumentParser(prog=self.prog.rsplit(" ", 1)[0])
        module.register(parent.add_subparsers(dest="benchmark", required=True))
        real = parent.parse_args([self.name, *getattr(args, "passed_on", [])])
        return real.func(real)


def register_all(subparsers) -> None:
    """Add every benchmark of this package as a subcommand of ``subparsers``.

    Each subcommand takes no arguments of its own: the caller parses with ``parse_known_args`` and
    stores what is left (the benchmark's options, ``--help``) as ``args.passed_on``; an
    ``args.passes_on`` of True says this subcommand accepts them.

    Args:
        subparsers: The object ``argparse.ArgumentParser.add_subparsers()`` returned.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="bench")
        >>> register_all(parser.add_subparsers(dest="benchmark", required=True))
    """
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            parser = subparsers.add_parser(info.name, help=_summary(info.name), add_help=False)
            parser.set_defaults(func=_LazyBenchmark(info.name, parser.prog), passes_on=True)


def parse_with_benchmarks(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that a benchmark subcommand receives the arguments left over."""
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_on", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.passed_on = rest
    return args
