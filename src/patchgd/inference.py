"""Use a trained model: load it from a checkpoint and predict images, as ``patchgd predict`` does.

Example:
    >>> from patchgd.inference import load_model, predict
    >>> model, cfg = load_model("runs/demo/best.pt")  # doctest: +SKIP
    >>> predict(model, cfg, ["scan.png"])  # doctest: +SKIP
    [{'image': 'scan.png', 'class': 3, 'class_name': '3', 'probabilities': [...]}]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, migrate_checkpoint
from .config import Config, config_from_dict
from .data.datasets import load_image
from .data.lazy import LazyImage
from .engine.build import build_model
from .engine.data import check_patch_fits, class_name, item_shape, read_options
from .grid import grid_shape
from .model.fill import fill_chunk
from .runlog import Progress

__all__ = ["load_input", "load_model", "predict", "prediction"]


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """The model a checkpoint holds, in eval mode on ``device``, and its run's config (classes, reading).

    Only the architecture is built from the config (no hub or weights file is needed); the weights are the
    checkpoint's, read with ``weights_only=True``.

    A checkpoint of an earlier release is migrated (:func:`~patchgd.checkpoint.migrate_checkpoint`).

    Raises:
        CheckpointError: The file is missing, cannot be read safely, is no patchgd checkpoint, or comes from
            a newer release.
    """
    path = Path(checkpoint)
    state = migrate_checkpoint(load_checkpoint(path, map_location=device), path,
                               warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    cfg = config_from_dict(state["config"], source=str(path))
    model = build_model(cfg, weights=False)  # the architecture alone: the weights are the checkpoint's
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def load_input(path: str | Path, cfg: Config, device: str | torch.device = "cpu"):
    """An image (or slide, or sequence) read as the run read its data: ``(item, batch of one)``; a slide stays
    a :class:`~patchgd.data.lazy.LazyImage` that the model reads in pieces.

    Raises:
        ValueError: The image is smaller than one patch, which training refuses too.
    """
    item = load_image(path, **read_options(cfg))
    check_patch_fits(cfg, item_shape(item), path)
    return item, (item[None].to(device) if isinstance(item, torch.Tensor) else [item])


def prediction(cfg: Config, path: str | Path, logits: torch.Tensor) -> dict:
    """One image's prediction from its logits ``(1, classes)``: the class, its name and every probability."""
    probs = torch.softmax(logits.float(), dim=1)[0].cpu()
    index = int(probs.argmax())
    return {"image": str(path), "class": index, "class_name": class_name(cfg, index),
            "probabilities": [round(float(p), 6) for p in probs]}


def predict(model: nn.Module, cfg: Config, paths: Sequence[str | Path], device: str | torch.device = "cpu",
            *, progress: bool = False) -> list[dict]:
    """Predict each image of ``paths`` (Fig. 3b of the paper for PatchGD: fill ``Z``, then the head).

    Args:
        model: A model from :func:`load_model`, on ``device``.
        cfg: Its config.
        paths: Image, slide or ``.npz`` sequence files.
        device: Where the model is.
        progress: Show progress over the patches of a large image on stderr.

    Returns:
        One :func:`prediction` per path.
    """
    out = []
    for path in paths:
        item, batch = load_input(path, cfg, device)
        shown = patch_progress(model, item, str(path)) if progress else contextlib.nullcontext()
        with torch.inference_mode(), shown:
            out.append(prediction(cfg, path, model(batch)))
    return out


def patch_progress(model: nn.Module, image: torch.Tensor | LazyImage, desc: str):
    """A context that shows progress over the patches ``model`` encodes for ``image`` when that takes more
    than one backbone call (a large image), on stderr; a no-op otherwise."""
    shape = item_shape(image)
    if not hasattr(model, "fill_z") or len(shape) != 3:  # a GD model, or a sequence (1-D PatchGD)
        return contextlib.nullcontext()
    _, height, width = shape
    cells = grid_shape(height, width, model.patch_size)
    total = cells[0] * cells[1]
    if total <= fill_chunk(1, cells[1], isinstance(image, LazyImage), fill_batch_size=model.fill_batch_size):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def shown():
        bar = Progress([], desc, total=total, every=max(1, total // 10), unit="patch",
                       write=lambda line: print(line, file=sys.stderr))
        hook = model.backbone.register_forward_hook(lambda module, inputs, out: bar.update(len(out)))
        try:
            yield
        finally:
            hook.remove()
            bar.close()

    return shown()
