"""Sub-bag training (``method: subbag``), the cheapest end-to-end recipe of the peers (ABMILX and the
sub-bag training it builds on): each step encodes ``k`` random cells of each image with gradients and a set
head classifies those cells alone; evaluation encodes every cell, as PatchGD's does.

A step costs ``k`` encodes with gradients and no fill: against PatchGD it gives up the global view (the
head never sees the cells it did not sample in a step) for the cost of its sampled cells only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..data.lazy import SourceGrid
from ..model import PatchGDClassifier
from .base import Step, classification_loss
from .schedule import patches_per_iteration

__all__ = ["SubBag"]


class BagForward(nn.Module):
    """Encode the sampled patches and classify each image's bag of codes (DDP wraps this module)."""

    def __init__(self, model: PatchGDClassifier):
        super().__init__()
        self.model = model

    def forward(self, patches: torch.Tensor, image_idx: torch.Tensor, position: torch.Tensor, batch: int,
                size: int, mask: torch.Tensor | None) -> torch.Tensor:
        codes = self.model.encode(patches)
        bag = codes.new_zeros(batch, self.model.latent_dim, size)
        bag[image_idx, :, position] = codes
        return self.model.classify(bag, mask)


class SubBag(Step):
    """One call of :meth:`step`: ``k`` random cells per image encoded with gradients, the head on those alone,
    one update.

    Args:
        model: A :class:`~patchgd.PatchGDClassifier` with a set head (``"attention"`` or ``"mean"``).
        optimizer: Optimizer over the model's parameters.
        sampling: ``k = ceil(sampling * T)`` of an image's ``T`` sampleable cells (all, or its tissue).
        patches_per_step: ``k`` as a number of cells per image instead (at most ``T``).
        amp: Mixed precision, as for PatchGD.
        generator: Random generator of the cells drawn.

    Example:
        >>> model = PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, latent_dim=8, head="attention")
        >>> stats = SubBag(model, torch.optim.Adam(model.parameters()), sampling=0.25).step(
        ...     torch.randn(2, 3, 128, 128), torch.tensor([0, 2]))
        >>> stats["patches_per_image"]
        4
    """

    def __init__(self, model: PatchGDClassifier, optimizer: torch.optim.Optimizer, sampling: float = 0.25, *,
                 patches_per_step: int | None = None, amp: str | None = None, generator: torch.Generator | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        super().__init__(model, optimizer, amp, forward_module=BagForward(model), wrap=wrap)
        if not 0 < sampling <= 1:
            raise ValueError(f"sampling must be a fraction in (0, 1], got {sampling}")
        self.sampling, self.patches_per_step, self.generator = sampling, patches_per_step, generator

    def step(self, images: torch.Tensor | Sequence, labels: torch.Tensor) -> dict:
        """One sub-bag step on a batch: ``loss``, ``step_time``, ``patches_per_image`` (``k``, the most of
        any image) and ``optimizer_steps``."""
        start = time.perf_counter()
        model = self.model
        images, labels = self.inputs(images, labels)
        grid = model.grid(images)
        image_idx, cell_idx, position, sizes = [], [], [], []
        for b in range(grid.batch_size):
            cells = grid.sampleable(b) if isinstance(grid, SourceGrid) else torch.arange(grid.num_cells)
            k = patches_per_iteration(self.sampling, len(cells), self.patches_per_step)
            picked = cells[torch.randperm(len(cells), generator=self.generator)[:k]]
            image_idx.append(torch.full_like(picked, b))
            cell_idx.append(picked)
            position.append(torch.arange(k))
            sizes.append(k)
        image_idx, cell_idx, position = torch.cat(image_idx), torch.cat(cell_idx), torch.cat(position)
        size = max(sizes)
        mask = None
        if min(sizes) < size:  # images with fewer cells than k: their bags are padded, and the head masks it
            mask = (torch.arange(size)[None] < torch.tensor(sizes)[:, None]).to(grid.device, torch.get_default_dtype())
            mask = mask[:, None]
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device = grid.device
        with self.autocast():
            logits = self.forward_module(grid.patches(cell_idx.to(device), image_idx.to(device)), image_idx.to(device),
                                         position.to(device), grid.batch_size, size, mask)
        loss = classification_loss(logits, labels)
        self.backward(loss)
        self.update()
        self.sync()
        return {"loss": loss.item(), "inner_losses": [loss.item()], "fill_time": 0.0,
                "inner_time": time.perf_counter() - start, "step_time": time.perf_counter() - start,
                "inner_iterations": 1, "patches_per_image": size, "optimizer_steps": 1}
