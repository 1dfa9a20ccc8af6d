"""Speed and memory benchmarks, one module each, run as ``patchgd bench <name>`` or ``python -m patchgd.bench``.

Every public module of this package exposes ``register(subparsers)``, which adds its subcommand whose
``func`` prints a table and writes a JSON of the measurements; :func:`register_all` finds them all, so a
new benchmark is one new module.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["register_all"]


def register_all(subparsers) -> None:
    """Add every benchmark of this package as a subcommand of ``subparsers``.

    Args:
        subparsers: The object ``argparse.ArgumentParser.add_subparsers()`` returned.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="bench")
        >>> register_all(parser.add_subparsers(dest="benchmark", required=True))
    """
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
