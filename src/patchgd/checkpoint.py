"""The one home of checkpoints: written atomically, read only with PyTorch's safe loader.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (model, optimizer and
scheduler state, the resolved config, the RNG states, the metrics so far), so that
``torch.load(..., weights_only=True)`` reads all of it. Anything else in the file is refused: unpickling
an arbitrary object can run code, and checkpoints travel between labs.

Example:
    >>> model = torch.nn.Linear(4, 2)
    >>> save_checkpoint("runs/demo/last.pt", {"model": model.state_dict(), "epoch": 3})
    >>> load_checkpoint("runs/demo/last.pt")["epoch"]
    3
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .io import atomic_file

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "migrate_checkpoint", "save_checkpoint"]

# The format of the run checkpoints this release writes (their "format" key; none: format 1, the releases
# before formats were recorded). A change of what a checkpoint holds raises it, adds its step to
# migrate_checkpoint and a fixture under tests/fixtures/checkpoints/.
CHECKPOINT_FORMAT = 2

# The first bytes of a torch.save file: a zip archive, or (torch < 1.6) a pickle stream (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


class CheckpointError(ValueError):
    """A file that cannot be loaded as a checkpoint; the message names it and says why."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save(state, path)`` written atomically: an interrupted save never corrupts the last good one.

    Args:
        path: The checkpoint file; its folder is created if needed.
        state: Tensors, numbers, strings, lists and dicts only, so that :func:`load_checkpoint` reads it.
    """
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(..., weights_only=True)``.

    Args:
        path: The file.
        map_location: Where tensors go (``torch.load``'s argument).

    Returns:
        The checkpoint's dict.

    Raises:
        CheckpointError: The file is missing, empty, not written by ``torch.save``, truncated, holds
            objects the safe loader refuses, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); expected a file written by torch.save")
    with path.open("rb") as f:
        magic = f.read(len(_ZIP_MAGIC))
    if not zipfile.is_zipfile(path):
        if magic == _ZIP_MAGIC:  # a zip's directory is at its end: a file cut short has none
            raise CheckpointError(f"{path} is a truncated checkpoint ({path.stat().st_size} bytes, its end "
                                  "missing: an interrupted copy or download?); copy it again")
        if magic[:1] != _PICKLE_MAGIC:
            raise CheckpointError(f"{path} is not a checkpoint: not a file written by torch.save")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe loader's message names what it refused, e.g. "unsupported GLOBAL posix.system whose ...".
        why = next((line.strip().rstrip(".") for line in str(err).splitlines() if "nsupported" in line), "")
        raise CheckpointError(
            f"{path} was refused by the safe loader (torch.load with weights_only=True): it holds objects "
            f"other than tensors and plain values{f' ({why})' if why else ''}; loading it could run code, "
            "so it is not loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a patchgd checkpoint: it holds a {type(state).__name__}, "
                              "expected a dict")
    return state


def migrate_checkpoint(state: dict[str, Any], path: str | Path, warn=None) -> dict[str, Any]:
    """A run checkpoint of any format this release reads, as this release writes them.

    Format 1 (no ``format`` key) to 2: ``best_accuracy`` left (``train.monitor`` picks the best epoch;
    ``best_epoch`` names it). Config keys this release does not know (renamed or removed since) are
    dropped, with one line to ``warn``; keys added since take their defaults when the config is read.

    Raises:
        CheckpointError: A format newer than this release's, or a file that is no run checkpoint.
    """
    from .config import known_keys

    version = state.get("format", 1)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a checkpoint of format {version}, written by a newer patchgd; this "
                              f"release reads formats 1 to {CHECKPOINT_FORMAT}: upgrade patchgd")
    if "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a patchgd checkpoint (expected a dict with 'model' and 'config')")
    state = dict(state)
    if version < 2:
        state.pop("best_accuracy", None)
    state["config"], dropped = known_keys(state["config"])
    if dropped and warn is not None:
        warn(f"{path}: config key(s) {', '.join(dropped)} of another patchgd release are not known here; ignored")
    state["format"] = CHECKPOINT_FORMAT
    return state
