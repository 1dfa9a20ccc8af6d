"""The GD baselines' step: the whole image through the model, optionally in micro-batches."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .base import Step, classification_loss


class GD(Step):
    """Plain gradient descent on whole images: the GD and GD-extended baselines.

    With ``micro_batch_size`` each batch is split into micro-batches of that many images whose gradients
    accumulate (each loss weighted by its share of the batch) before one update, so the update is the whole
    batch's mean gradient while only one micro-batch's activations are held: the paper's GD with gradient
    accumulation. BatchNorm then normalises each micro-batch on its own statistics. Under DDP only the last
    micro-batch's backward all-reduces.

    Args:
        model: A :class:`~patchgd.model.GDClassifier` or :class:`~patchgd.model.GDExtendedClassifier`.
        optimizer: Optimizer over the model's parameters.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` (CUDA).
        micro_batch_size: Images per forward/backward; None: the whole batch at once.
        wrap: Applied once to the model as the module whose forward carries gradients (DDP under
            ``torchrun``: :func:`patchgd.distributed.ddp`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: str | None = None,
                 micro_batch_size: int | None = None, *, wrap: Callable[[nn.Module], nn.Module] | None = None):
        super().__init__(model, optimizer, amp, wrap=wrap)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}; expected at least 1 image")
        self.micro_batch_size = micro_batch_size

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """One update on a batch (forward/backward per micro-batch); returns ``loss`` (the batch mean),
        ``step_time`` and ``micro_batches``."""
        start = time.perf_counter()
        images, labels = self.inputs(images, labels)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        size = len(labels)
        starts = range(0, size, self.micro_batch_size or size)
        loss_sum = 0.0
        for first in starts:
            part = slice(first, first + (self.micro_batch_size or size))
            with self.gradient_sync(first == starts[-1]):
                with self.autocast():
                    logits = self.forward_module(images[part])
                loss = classification_loss(logits, labels[part]) * (len(labels[part]) / size)
                self.backward(loss)
            loss_sum += loss.item()
        self.update()
        self.sync()
        return {"loss": loss_sum, "step_time": time.perf_counter() - start, "optimizer_steps": 1,
                "micro_batches": len(starts)}
