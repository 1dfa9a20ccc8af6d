"""Training steps: PatchGD (Algorithm 1 of the paper) and the GD baselines, behind one interface.

Each method object wraps a model and an optimizer and exposes ``step(images, labels) -> dict``; a trainer
switches method by name through :func:`create_model` and :func:`create_method` and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grid import PatchGrid, SourceGrid, cell_mask
from .model import GDClassifier, GDExtendedClassifier, PatchGDClassifier

__all__ = ["PatchGD", "GD", "sample_schedule", "patches_per_iteration", "default_inner_iterations", "create_model", "create_method", "METHODS"]

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


class _Step:
    """What every method shares: device, mixed precision, label checks and the optimizer update.

    ``forward_module`` is the module whose forward carries gradients; :func:`patchgd.distributed.wrap`
    puts it under DistributedDataParallel, and :meth:`gradient_sync` says when its backward all-reduces.
    """

    forward_module: nn.Module

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: str | None = None):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of None, 'bf16', 'fp16'; got {amp!r}")
        self.model = model
        self.forward_module = model
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
        :class:`~patchgd.grid.LazyImage` per image (images of different sizes, slides), which stays where
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


def _ceil(x: float) -> int:
    """``ceil`` that ignores float noise: ``0.28 * 25`` is ``7.000000000000001``, meant as 7."""
    return math.ceil(round(x, 9))


def patches_per_iteration(sampling: float, num_cells: int, patches_per_step: int | None = None) -> int:
    """``k``, the cells per image that carry gradients in one inner iteration: ``ceil(sampling * m * n)``,
    or the absolute ``patches_per_step`` when given (at most ``m * n``)."""
    if patches_per_step is not None:
        return min(patches_per_step, num_cells)
    return _ceil(sampling * num_cells)


def default_inner_iterations(sampling: float, max_sampled: float) -> int:
    """``ζ = ceil(max_sampled / sampling)``: inner iterations that visit ``max_sampled`` of the cells."""
    return _ceil(max_sampled / sampling)


def sample_schedule(batch_size: int, num_cells: int, k: int, inner_iterations: int,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The default sampler: ``inner_iterations`` chunks of ``k`` cells per image, without repeats.

    Per image, cells come from a random permutation of all ``num_cells`` cells, taken ``k`` at a time;
    when a permutation runs out, a fresh one continues it, with the cells still in the current chunk
    moved to its end, so that no chunk ever holds a cell twice.

    Args:
        batch_size: Images ``B``.
        num_cells: Cells per image ``m * n``.
        k: Cells per image and inner iteration (``1 <= k <= num_cells``).
        inner_iterations: Number of chunks ``ζ``.
        generator: Random generator (default: torch's global one).

    Returns:
        A list of ``inner_iterations`` LongTensors of shape ``(B, k)``.
    """
    total = k * inner_iterations
    orders = []
    for _ in range(batch_size):
        order = torch.randperm(num_cells, generator=generator)
        while order.numel() < total:
            # The chunk still open at the end of ``order`` must not meet its own cells again.
            open_chunk = order[order.numel() // k * k:]
            fresh = torch.randperm(num_cells, generator=generator)
            clash = torch.isin(fresh, open_chunk)
            order = torch.cat([order, fresh[~clash], fresh[clash]])
        orders.append(order[:total])
    return list(torch.stack(orders).view(batch_size, inner_iterations, k).unbind(1))


class InnerIteration(nn.Module):
    """The forward of one inner iteration as a module of its own, so that DDP can wrap it: encode the
    sampled patches, write their features into their cells of ``Z``, classify ``Z``; returns the logits
    and ``Z`` (returned rather than relied on in place, should a wrapper ever copy its inputs)."""

    def __init__(self, model: PatchGDClassifier):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, patches: torch.Tensor, image_idx: torch.Tensor, cell_idx: torch.Tensor,
                cell_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.encode(patches)
        z.view(z.shape[0], self.model.latent_dim, -1)[image_idx, :, cell_idx] = features.to(z.dtype)
        return self.model.classify(z, cell_mask), z


class PatchGD(_Step):
    """Patch Gradient Descent: one call of :meth:`step` is one iteration of Algorithm 1 on a batch.

    Args:
        model: A :class:`~patchgd.PatchGDClassifier`.
        optimizer: Optimizer over the model's parameters.
        sampling: Fraction of the cells of each image that carries gradients in one inner iteration;
            ``k = ceil(sampling * m * n)``.
        patches_per_step: ``k`` given as an absolute number of cells per image instead (at most ``m * n``),
            so that the gradient-carrying patches, and memory, stay fixed as images grow; then
            ``ζ = ceil(max_sampled * m * n / k)``.
        max_sampled: Fraction of the cells visited per batch; ``ζ = ceil(max_sampled / sampling)``.
        inner_iterations: ``ζ`` given directly (overrides ``max_sampled``).
        grad_accum_steps: ``ε``, inner iterations per optimizer update (default ``ζ``: one update per
            batch). A last, shorter group also updates, its loss scaled by its own length.
        fill_mode: ``"train"`` fills ``Z`` with the backbone in training mode (the paper's code: BatchNorm
            uses batch statistics in fill and inner steps alike), ``"eval"`` in evaluation mode.
        fill_batch_size: Patches per backbone call while filling (default ``B * k``, what an inner
            iteration already holds, so a larger image never raises the peak through the fill).
        amp: ``None``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA, with a gradient scaler).
        generator: Random generator for the sampler.

    Example:
        >>> model = PatchGDClassifier("test_resnet", num_classes=10, patch_size=32)
        >>> trainer = PatchGD(model, torch.optim.Adam(model.parameters()), sampling=0.25)
        >>> stats = trainer.step(torch.randn(2, 3, 128, 128), torch.tensor([3, 7]))
    """

    def __init__(self, model: PatchGDClassifier, optimizer: torch.optim.Optimizer, sampling: float = 0.25,
                 max_sampled: float = 1.0, inner_iterations: int | None = None,
                 grad_accum_steps: int | None = None, *, patches_per_step: int | None = None,
                 fill_mode: str = "train", fill_batch_size: int | None = None, amp: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(model, optimizer, amp)
        if not 0 < sampling <= 1:
            raise ValueError(f"sampling must be a fraction in (0, 1], got {sampling}")
        if not max_sampled > 0:
            raise ValueError(f"max_sampled must be a positive fraction of the cells, got {max_sampled}")
        for name, value in (("inner_iterations", inner_iterations), ("grad_accum_steps", grad_accum_steps),
                            ("fill_batch_size", fill_batch_size), ("patches_per_step", patches_per_step)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if fill_mode not in ("train", "eval"):
            raise ValueError(f"fill_mode must be 'train' or 'eval', got {fill_mode!r}")
        self.sampling = sampling
        self.patches_per_step = patches_per_step
        self.max_sampled = max_sampled
        self.inner_iterations = inner_iterations
        self.grad_accum_steps = grad_accum_steps
        self.fill_mode = fill_mode
        self.fill_batch_size = fill_batch_size
        self.generator = generator
        self.forward_module = InnerIteration(model)
        # How Z is filled; distributed.parallel_fill replaces it to split one batch's cells over processes.
        self.fill = model.fill_z

    def schedule_for(self, grid: PatchGrid | SourceGrid,
                     schedule: Sequence[torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cells of each inner iteration as ``(image, cell)`` index pairs, image-major.

        Sampled per image among its sampleable cells (all of them, or the tissue cells of a
        :class:`~patchgd.grid.SourceGrid` under a tissue mask), ``k_i = ceil(sampling * T_i)`` of image
        ``i``'s ``T_i`` sampleable cells per inner iteration; or the given schedule, checked.
        """
        cells = grid.num_cells
        if schedule is None:
            allowed = [grid.sampleable(b) if isinstance(grid, SourceGrid) else torch.arange(cells)
                       for b in range(grid.batch_size)]
            largest = max(len(a) for a in allowed)  # an absolute k sets ζ by the largest image
            fraction = self.sampling if self.patches_per_step is None else \
                patches_per_iteration(self.sampling, largest, self.patches_per_step) / largest
            zeta = self.inner_iterations or default_inner_iterations(fraction, self.max_sampled)
            picks = []  # per image, zeta chunks of its cells
            for cells_b in allowed:
                k = patches_per_iteration(self.sampling, len(cells_b), self.patches_per_step)
                picks.append([cells_b[chunk[0]] for chunk in sample_schedule(1, len(cells_b), k, zeta,
                                                                              self.generator)])
            return [(torch.cat([torch.full_like(p[j], b) for b, p in enumerate(picks)]).to(grid.device),
                     torch.cat([p[j] for p in picks]).to(grid.device)) for j in range(zeta)]
        if self.inner_iterations is not None and len(schedule) != self.inner_iterations:
            raise ValueError(f"schedule has {len(schedule)} entries but inner_iterations={self.inner_iterations}")
        if len(schedule) == 0:
            raise ValueError("schedule is empty: expected one entry per inner iteration")
        checked = []
        for j, idx in enumerate(schedule):
            idx = torch.as_tensor(idx)
            if idx.dtype not in (torch.int64, torch.int32) or idx.dim() not in (1, 2) or \
                    (idx.dim() == 2 and idx.shape[0] != grid.batch_size):
                raise ValueError(f"schedule[{j}] must be an integer tensor of shape (k,) or "
                                 f"({grid.batch_size}, k); got {tuple(idx.shape)} {idx.dtype}")
            idx = idx.long().expand(grid.batch_size, -1)
            k = idx.shape[1]
            if not 1 <= k <= cells:
                raise ValueError(f"schedule[{j}] asks for {k} patches per image but the grid has "
                                 f"{grid.rows}x{grid.cols} = {cells} cells")
            if idx.min() < 0 or idx.max() >= cells:
                bad = idx[(idx < 0) | (idx >= cells)][0].item()
                raise ValueError(f"schedule[{j}] holds cell index {bad}, outside the {grid.rows}x{grid.cols} "
                                 f"grid (expected 0..{cells - 1})")
            if (idx.sort(dim=1).values.diff(dim=1) == 0).any():
                raise ValueError(f"schedule[{j}] repeats a cell within an image; each cell may appear once")
            image_idx = torch.arange(grid.batch_size).repeat_interleave(k)
            cell_idx = idx.reshape(-1).cpu()
            if isinstance(grid, SourceGrid) and not grid.is_encoded(image_idx, cell_idx).all():
                bad = (~grid.is_encoded(image_idx, cell_idx)).nonzero()[0].item()
                raise ValueError(f"schedule[{j}] holds cell {cell_idx[bad].item()} of image {image_idx[bad].item()}, "
                                 "which is background (outside the tissue mask) or beyond the image's own grid")
            checked.append((image_idx.to(grid.device), cell_idx.to(grid.device)))
        return checked

    def step(self, images: torch.Tensor | Sequence, labels: torch.Tensor,
             schedule: Sequence[torch.Tensor] | None = None) -> dict:
        """One iteration of Algorithm 1 on a batch.

        Args:
            images: ``(B, C, H, W)`` images, or one ``(C, H, W)`` tensor or
                :class:`~patchgd.grid.LazyImage` per image (see :meth:`PatchGDClassifier.grid`).
            labels: ``(B,)`` class indices.
            schedule: Optional cells per inner iteration: flat row-major indices, ``(k,)`` (the same cells
                in every image) or ``(B, k)`` per image.

        Returns:
            ``loss`` (mean over inner iterations), ``inner_losses`` (each inner iteration's loss, in
            order), ``fill_time``, ``inner_time``, ``step_time`` in seconds,
            ``inner_iterations``, ``patches_per_image`` (the most cells an image has in the first inner
            iteration, ``k``) and ``optimizer_steps``.
        """
        start = time.perf_counter()
        model = self.model
        images, labels = self.inputs(images, labels)
        grid = model.grid(images)
        schedule = self.schedule_for(grid, schedule)
        mask = cell_mask(grid)
        zeta = len(schedule)
        eps = self.grad_accum_steps or zeta
        model.train()
        self.optimizer.zero_grad(set_to_none=True)

        if self.fill_mode == "eval":
            model.backbone.eval()
        with self.autocast():
            z = self.fill(grid, self.fill_batch_size or len(schedule[0][1]))
        model.backbone.train()
        self.sync()
        filled = time.perf_counter()

        losses, updates = [], 0
        for j, (image_idx, cell_idx) in enumerate(schedule, start=1):
            group_len = min(eps, zeta - (j - 1) // eps * eps)
            updating = j % eps == 0 or j == zeta
            z = z.detach()  # earlier inner iterations stay in Z as values, not as graph
            with self.gradient_sync(updating):  # under DDP, only the updating iteration all-reduces
                with self.autocast():
                    logits, z = self.forward_module(z, grid.patches(cell_idx, image_idx), image_idx, cell_idx, mask)
                loss = classification_loss(logits, labels)
                self.backward(loss / group_len)
            losses.append(loss.detach())
            if updating:
                self.update()
                updates += 1
        self.sync()
        end = time.perf_counter()
        inner_losses = torch.stack(losses).tolist()  # one device sync for all of them
        return {"loss": sum(inner_losses) / zeta, "inner_losses": inner_losses, "fill_time": filled - start,
                "inner_time": end - filled, "step_time": end - start, "inner_iterations": zeta,
                "patches_per_image": int(torch.bincount(schedule[0][0]).max()), "optimizer_steps": updates}


class GD(_Step):
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
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: str | None = None,
                 micro_batch_size: int | None = None):
        super().__init__(model, optimizer, amp)
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


METHODS = ("patchgd", "gd", "gd-extended")


def create_model(method: str, backbone: str | nn.Module, num_classes: int, *, patch_size: int = 128,
                 latent_dim: int = 256, in_chans: int = 3, pretrained: bool | str | dict | None = None,
                 backbone_args: dict | None = None, freeze: str | int | None = None,
                 grad_checkpointing: bool = False, head: str = "conv", head_width: int = 256,
                 head_dropout: float = 0.2, head_depth: int = 2, head_heads: int = 4, pad_value: float = 0.0, image_size: int | None = None,
                 channels_last: bool = False, mean: list[float] | None = None, std: list[float] | None = None,
                 fill_workers: int = 0) -> nn.Module:
    """Build the model a method trains.

    Args:
        method: ``"patchgd"``, ``"gd"`` or ``"gd-extended"``.
        backbone: A timm model name or a module (see the model classes).
        num_classes: Number of classes.
        patch_size: PatchGD's patch side.
        latent_dim: PatchGD's latent size ``s``.
        in_chans: Image channels.
        pretrained: Pretrained weights of a timm backbone: ``True``, a local file or snapshot folder, or an
            origin record (:func:`patchgd.pretrained.resolve_encoder`).
        backbone_args: Extra ``timm.create_model`` arguments.
        freeze: None, ``"all"`` or the stem and first N stages/blocks of the encoder.
        grad_checkpointing: Gradient checkpointing in the encoder.
        head: PatchGD's head: ``"conv"`` (the paper's), ``"conv1d"`` (sequences), ``"transformer"`` or
            ``"attention"`` (gated attention-MIL pooling).
        head_width: Channels of the conv head (PatchGD, GD-extended); token width of the transformer head.
        head_dropout: Dropout of the head.
        head_depth: Encoder layers of the transformer head.
        head_heads: Attention heads of the transformer head.
        pad_value: PatchGD's padding value.
        image_size: Input size of the whole image, for GD backbones built for one (ViTs).
        channels_last: Channels-last memory format.
        mean: Per-channel mean of the [0, 1]-scaled pixels (the model normalises on the device).
        std: Per-channel standard deviation.
        fill_workers: PatchGD's reader processes for disk-backed images while filling ``Z``.
    """
    encoder = dict(in_chans=in_chans, pretrained=pretrained, backbone_args=backbone_args, freeze=freeze,
                   grad_checkpointing=grad_checkpointing, channels_last=channels_last, mean=mean, std=std)
    if method == "patchgd":
        return PatchGDClassifier(backbone, num_classes, patch_size, latent_dim, head, pad_value=pad_value,
                                 head_width=head_width, head_dropout=head_dropout, head_depth=head_depth,
                                 head_heads=head_heads, fill_workers=fill_workers, **encoder)
    if head != "conv":
        raise ValueError(f"head={head!r} is PatchGD's; the {method} baseline has its own classifier or conv head")
    common = dict(img_size=image_size, **encoder)
    if method == "gd":
        return GDClassifier(backbone, num_classes, **common)
    if method == "gd-extended":
        return GDExtendedClassifier(backbone, num_classes, head_width=head_width, head_dropout=head_dropout,
                                    **common)
    raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")


def create_method(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, amp: str | None = None,
                  micro_batch_size: int | None = None, **patchgd_options) -> PatchGD | GD:
    """The step object for ``method``; ``patchgd_options`` go to :class:`PatchGD` (ignored by GD), and
    ``micro_batch_size`` to :class:`GD` (PatchGD bounds its memory with ``sampling`` instead)."""
    if method == "patchgd":
        if micro_batch_size is not None:
            raise ValueError("train.micro_batch_size splits the batches of gd and gd-extended; PatchGD bounds its "
                             "memory with patchgd.sampling or patchgd.patches_per_step instead")
        return PatchGD(model, optimizer, amp=amp, **patchgd_options)
    if method in ("gd", "gd-extended"):
        return GD(model, optimizer, amp=amp, micro_batch_size=micro_batch_size)
    raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
