"""What every training step shares: mixed precision, the loss, label checks and the optimizer update."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None):
    """Mixed precision ``amp`` (``None``, ``"bf16"``, ``"fp16"``) for ``device``; a no-op for ``None``."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, computed in at least float32 even when the logits come out of mixed precision."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels)


class Step:
    """What every method shares: device, mixed precision, label checks and the optimizer update.

    ``forward_module`` is the module whose forward carries gradients (the model, or a subclass's own);
    ``wrap``, when given, is applied to it once here (:func:`patchgd.distributed.ddp` puts it under
    DistributedDataParallel), and :meth:`gradient_sync` says when its backward all-reduces.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: str | None = None, *,
                 forward_module: nn.Module | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of None, 'bf16', 'fp16'; got {amp!r}")
        self.model = model
        forward_module = model if forward_module is None else forward_module
        self.forward_module = forward_module if wrap is None else wrap(forward_module)
        self.optimizer = optimizer
        self.device = next(model.parameters()).device
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device (the model is on {self.device}); "
                             "use amp='bf16' on the CPU")
        self.amp = amp
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self):
        return autocast(self.device, self.amp)

    def gradient_sync(self, sync: bool):
        """Context for a forward and backward whose gradients are all-reduced over processes only if
        ``sync`` (under DDP; alone, gradients simply accumulate either way)."""
        if sync or not hasattr(self.forward_module, "no_sync"):
            return contextlib.nullcontext()
        return self.forward_module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self) -> None:
        """Apply the accumulated gradients and clear them."""
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def inputs(self, images: torch.Tensor | Sequence, labels: torch.Tensor) -> tuple[torch.Tensor | list, torch.Tensor]:
        """Move a batch to the model's device, checking the labels against the classes.

        ``images`` is a ``(B, C, H, W)`` tensor (``(B, C, L)`` for sequences), or a list with one ``(C, H, W)`` tensor or
        :class:`~patchgd.data.lazy.LazyImage` per image (images of different sizes, slides), which stays where
        it is: its patches travel to the device as they are read.
        """
        if isinstance(images, torch.Tensor):
            if images.dim() not in (3, 4):
                raise ValueError(f"images must be a (B, C, H, W) tensor (or (B, C, L) sequences), got shape "
                                 f"{tuple(images.shape)}")
            images = images.to(self.device, non_blocking=True)
        else:
            images = list(images)
        labels = torch.as_tensor(labels)
        if labels.shape != (len(images),) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be {len(images)} integer class indices (one per image), "
                             f"got shape {tuple(labels.shape)} and dtype {labels.dtype}")
        classes = self.model.num_classes
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            raise ValueError(f"label {labels[bad][0].item()} is outside the {classes} classes "
                             f"(expected 0..{classes - 1})")
        return images, labels.to(self.device, non_blocking=True).long()

    def sync(self) -> None:
        sync(self.device)
