"""What every ``patchgd`` command shares: reading the config, checking paths before torch loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config, load_config

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def add_config_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", required=required, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def config_from_args(args) -> Config:
    return load_config(args.config, args.set)


def require(path: str | Path, what: str) -> None:
    """``path`` exists, checked before torch loads so that a typo is reported at once."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
