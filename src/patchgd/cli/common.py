"""What every ``patchgd`` command shares: reading the config, checking paths before torch loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import PACKAGED_CONFIGS, Config, find_config, load_config

__all__ = ["PACKAGED_CONFIGS", "add_config_options", "config_from_args", "require"]


def add_config_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", required=required,
                        help="YAML config file, or the name of a packaged recipe (patchgd configs lists them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def config_from_args(args) -> Config:
    """``--config`` (a file, or a packaged recipe by name: said on stderr) with ``--set`` on top."""
    path = find_config(args.config)
    if path != Path(args.config):
        print(f"config: the packaged recipe {path.stem} ({path})", file=sys.stderr)
    return load_config(path, args.set)


def require(path: str | Path, what: str) -> None:
    """``path`` exists, checked before torch loads so that a typo is reported at once."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
