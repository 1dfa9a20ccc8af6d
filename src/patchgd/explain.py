"""See what the model sees: per-cell class evidence (heatmaps) and ``Z`` as an RGB picture (Fig. 5 of the paper).

PatchGD classifies a small latent grid ``Z``, one cell per patch, with a small head. That makes per-cell
evidence exact and cheap: :func:`occlusion_scores` replaces one cell of ``Z`` at a time by the code of a
blank patch (the background code) and reads how much the predicted class's logit drops, for every cell,
batching the occluded grids through the head only: the backbone runs once per image, in the fill.
:func:`gradient_scores` offers gradient x activation on ``Z`` as a second, first-order method.

Example:
    >>> model = PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, latent_dim=16).eval()
    >>> evidence = explain(model, torch.randn(1, 3, 96, 128))
    >>> evidence.scores.shape
    torch.Size([1, 3, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data.lazy import cell_mask
from .model import PatchGDClassifier

__all__ = ["METHODS", "Evidence", "occlusion_scores", "gradient_scores", "explain", "z_to_rgb"]

METHODS = ("occlusion", "grad")


@dataclass
class Evidence:
    """What :func:`explain` found for a batch.

    Attributes:
        z: ``(B, s, *grid)`` latent grid of the images.
        logits: ``(B, classes)`` the head's logits.
        target: ``(B,)`` the class the scores are about (the predicted one unless given).
        scores: ``(B, *grid)`` per-cell evidence for ``target``; positive cells support it.
        class_scores: ``(B, K, *grid)`` the same evidence for every class (``scores`` is ``target``'s).
        method: ``"occlusion"`` or ``"grad"``.
    """

    z: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    scores: torch.Tensor
    class_scores: torch.Tensor
    method: str


def _for_target(class_scores: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``(B, K, *grid)`` scores of every class -> those of ``target`` ``(B, *grid)`` (all when None)."""
    if target is None:
        return class_scores
    return class_scores[torch.arange(len(target), device=class_scores.device), target.to(class_scores.device)]


@torch.no_grad()
def occlusion_scores(model: PatchGDClassifier, z: torch.Tensor, code: torch.Tensor, target: torch.Tensor | None,
                     mask: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """Per cell, the drop of the ``target`` logit when that cell of ``Z`` is replaced by ``code``.

    Exact (no approximation) and cheap: only the head runs, on ``batch_size`` occluded grids at a time, and
    the same head calls give every class's drop. A cell that already holds ``code`` (a slide's background
    cell) scores exactly 0 without a head call: occluding it changes nothing, and a batched head call could
    only add rounding.

    Args:
        model: The classifier, its head in eval mode (so that each occluded grid is classified alone).
        z: ``(B, s, *grid)``.
        code: ``(s,)`` the value an occluded cell takes (:meth:`PatchGDClassifier.background_code`).
        target: ``(B,)`` class per image; None scores every class.
        mask: The cell mask of a batch of images of different sizes (see :meth:`PatchGDClassifier.classify`).
        batch_size: Occluded grids per head call.

    Returns:
        ``(B, *grid)``: ``logit(Z) - logit(Z with the cell occluded)`` of ``target``; ``(B, K, *grid)``
        for every class when ``target`` is None.
    """
    batch, latent = z.shape[:2]
    flat = z.reshape(batch, latent, -1)
    cells = flat.shape[2]
    scores = None
    for b in range(batch):
        own = None if mask is None else mask[b:b + 1]
        base = model.classify(z[b:b + 1], own)[0].float()
        if scores is None:
            scores = torch.zeros(batch, len(base), cells, device=z.device)
        unchanged = (flat[b] == code.to(z.dtype)[:, None]).all(dim=0)
        changed = (~unchanged).nonzero().flatten()
        for start in range(0, len(changed), batch_size):
            idx = changed[start:start + batch_size]
            occluded = flat[b].expand(len(idx), -1, -1).clone()
            occluded[torch.arange(len(idx), device=z.device), :, idx] = code.to(z.dtype)
            logits = model.classify(occluded.view(len(idx), *z.shape[1:]),
                                    None if own is None else own.expand(len(idx), *own.shape[1:]))
            scores[b][:, idx] = base[:, None] - logits.float().T
    return _for_target(scores.view(batch, -1, *z.shape[2:]), target)


def gradient_scores(model: PatchGDClassifier, z: torch.Tensor, target: torch.Tensor | None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient x activation: per cell, ``sum_s Z[s] * d logit_target / d Z[s]``.

    Args:
        model: The classifier, its head in eval mode.
        z: ``(B, s, *grid)``.
        target: ``(B,)`` class per image; None scores every class (one backward pass of the head each).
        mask: The cell mask of a batch of images of different sizes.

    Returns:
        ``(B, *grid)`` first-order estimate of each cell's contribution to the ``target`` logit;
        ``(B, K, *grid)`` for every class when ``target`` is None.
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        logits = model.classify(z, mask)
        classes = range(logits.shape[1]) if target is None else [None]
        grads = []
        for k in classes:
            picked = logits[:, k] if k is not None else logits.gather(1, target[:, None])
            grads.append(torch.autograd.grad(picked.sum(), z, retain_graph=k is not None)[0])
    scores = [(grad * z).sum(dim=1).detach() for grad in grads]
    return torch.stack(scores, dim=1) if target is None else scores[0]


def explain(model: PatchGDClassifier, images: torch.Tensor | Sequence, method: str = "occlusion",
            target: torch.Tensor | None = None) -> Evidence:
    """Fill ``Z`` (eval mode, Fig. 3b) and score every cell for the predicted (or ``target``) class.

    Args:
        model: A :class:`~patchgd.PatchGDClassifier`; put in eval mode for the call and restored after.
        images: ``(B, C, H, W)`` images or ``(B, C, L)`` sequences, or one item per image (tensors of any
            sizes, :class:`~patchgd.data.lazy.LazyImage` slides), as the model takes them.
        method: ``"occlusion"`` (default; cells replaced by the background code) or ``"grad"``.
        target: Optional ``(B,)`` class per image to explain instead of the prediction.

    Returns:
        An :class:`Evidence`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method {method!r}: expected one of {', '.join(METHODS)}")
    was_training = model.training
    model.eval()
    try:
        grid = model.grid(images.to(model.device) if isinstance(images, torch.Tensor) else list(images))
        z = model.fill_z(grid)
        mask = cell_mask(grid)
        with torch.no_grad():
            logits = model.classify(z, mask).float()
        target = logits.argmax(dim=1) if target is None else torch.as_tensor(target, device=z.device)
        if method == "occlusion":
            class_scores = occlusion_scores(model, z, model.background_code(grid), None, mask)
        else:
            class_scores = gradient_scores(model, z, None, mask)
    finally:
        model.train(was_training)
    return Evidence(z=z, logits=logits, target=target, scores=_for_target(class_scores, target),
                    class_scores=class_scores, method=method)


def z_to_rgb(z: torch.Tensor) -> np.ndarray:
    """One image's ``Z`` as colours: its cells projected on their first three principal components.

    Args:
        z: ``(s, *grid)`` latent grid of one image.

    Returns:
        ``(*grid, 3)`` float array in [0, 1]; each component stretched to the full range (a constant one
        is mid-grey).
    """
    cells = z.reshape(z.shape[0], -1).T.double()  # (cells, s)
    centred = cells - cells.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = centred @ vh[:3].T  # fewer than 3 when s or the cells are fewer
    rgb = torch.full((cells.shape[0], 3), 0.5, dtype=torch.float64)
    low, high = components.min(dim=0).values, components.max(dim=0).values
    spread = high - low
    varied = spread > 1e-12 * (1 + high.abs())
    rgb[:, :components.shape[1]][:, varied] = (components[:, varied] - low[varied]) / spread[varied]
    return rgb.view(*z.shape[1:], 3).numpy()
