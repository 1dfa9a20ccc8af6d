"""Memory-budget planner: the largest training setting whose measured peak fits ``memory.budget``.

The paper's "4 GB" columns mean "the largest batch that fits in 4 GB". The planner finds it by running
real training steps (the trainer's own builders, on random images of the training shape) and measuring
each with :class:`~patchgd.memory.PeakMemory`, as :func:`~patchgd.train.fit` measures its steps. GD and
GD-extended trade batch size only; PatchGD first trades batch size, then, at batch 1, the patches per
inner iteration ``k`` (its ``sampling``).

Example:
    >>> plan = plan_budget(cfg, image_shape=(3, 512, 512), device="cpu")
    >>> print(plan.describe())
    >>> cfg = plan.apply(cfg)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import distributed, train
from .config import Config
from .grid import grid_shape
from .memory import PeakMemory, cap_cuda_memory, format_size, parse_size

__all__ = ["BudgetError", "Plan", "Trial", "plan_budget", "plan_from_config"]


class BudgetError(ValueError):
    """Not even the smallest setting of the method fits the memory budget."""


class Trial(NamedTuple):
    """One measured setting: batch size, PatchGD's ``k`` (None for GD), peak (None: out of CUDA memory)."""

    batch_size: int
    patches_per_image: int | None
    peak_bytes: int | None


@dataclasses.dataclass
class Plan:
    """The chosen setting, with every trial that led to it.

    Attributes:
        method: ``cfg.method``.
        budget_bytes: The budget in bytes.
        batch_size: The chosen batch size.
        sampling: PatchGD's chosen sampling fraction (None for GD).
        patches_per_image: PatchGD's ``k`` per inner iteration (None for GD).
        num_cells: PatchGD's cells per image ``m * n`` (None for GD).
        inner_iterations: PatchGD's ``ζ`` under the chosen sampling (None for GD).
        peak_bytes: Measured peak of the chosen setting.
        trials: Every measured setting, in the order tried.
        device: Where the trials ran.
        capped: Whether the CUDA allocator was capped at the budget.
        processes: Data-parallel processes the plan is for: the budget and the batch are per process
            (each has its own device), the global batch is ``processes`` times the batch.
    """

    method: str
    budget_bytes: int
    batch_size: int
    sampling: float | None
    patches_per_image: int | None
    num_cells: int | None
    inner_iterations: int | None
    peak_bytes: int
    trials: list[Trial]
    device: torch.device
    capped: bool
    processes: int = 1

    def describe(self) -> str:
        """A short table of the trials and the choice."""
        cap = "allocator capped at the budget" if self.capped else "no allocator cap; steps measured"
        lines = [f"memory plan: {self.method} on {self.device}, budget {format_size(self.budget_bytes)} ({cap})",
                 f"  {'batch':>5}  {'k':>4}  {'peak':>11}  fits"]
        for t in self.trials:
            peak = "out of mem" if t.peak_bytes is None else format_size(t.peak_bytes)
            fits = "yes" if t.peak_bytes is not None and t.peak_bytes <= self.budget_bytes else "no"
            lines.append(f"  {t.batch_size:>5}  {t.patches_per_image or '-':>4}  {peak:>11}  {fits}")
        choice = f"chose batch {self.batch_size}"
        if self.sampling is not None:
            choice += (f", k {self.patches_per_image} of {self.num_cells} cells (sampling {self.sampling:.4g}, "
                       f"ζ {self.inner_iterations})")
        lines.append(f"{choice}: peak {format_size(self.peak_bytes)}")
        if self.processes > 1:
            lines.append(f"budget, batch and peak are per process: {self.processes} processes train a global "
                         f"batch of {self.batch_size * self.processes} (train.batch_size stays per process)")
        configured_k = self.trials[0].patches_per_image
        if self.sampling is not None and self.patches_per_image < configured_k:
            lines.append(f"k lowered from {configured_k} with max_sampled kept: each batch takes more inner "
                         "iterations (ζ) of fewer patches")
        return "\n".join(lines)

    def apply(self, cfg: Config) -> Config:
        """``cfg`` with the chosen batch size (and PatchGD sampling), as a new Config."""
        return _setting(cfg, self.batch_size, self.sampling)


def _setting(cfg: Config, batch_size: int, sampling: float | None) -> Config:
    """``cfg`` with another batch size and, unless None, another PatchGD sampling."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
    if sampling is not None:
        cfg = dataclasses.replace(cfg, patchgd=dataclasses.replace(cfg.patchgd, sampling=sampling))
    return cfg


def _largest_fitting(fits: Callable[[int], bool], high: int) -> int:
    """The largest ``x`` in ``[1, high]`` with ``fits(x)``, for ``fits`` true up to some point; 0 if none.

    Doubling from 1 rather than trying ``high`` first: on the CPU nothing caps a trial, so a trial far
    over budget would really allocate that much; the first one over budget doubles one that fit.
    """
    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None and good < high:
        x = min(2 * good, high)
        good, bad = (x, None) if fits(x) else (good, x)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _measure(cfg: Config, image_shape: tuple[int, ...], device: torch.device) -> tuple[int | None, dict]:
    """Peak and stats of one training step of ``cfg`` after a warm-up step, everything built as
    :func:`~patchgd.train.fit` builds it; ``(None, {})`` if a capped CUDA device ran out of memory."""
    torch.manual_seed(cfg.train.seed)  # every trial starts from the same weights and data
    model = train.build_model(cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.method == "patchgd":
        model.fill_batch_size = cfg.patchgd.fill_batch_size or train.patches_per_step(cfg, image_shape)
    optimizer = train.build_optimizer(cfg, model)
    method = train.build_method(cfg, model, optimizer, torch.Generator().manual_seed(cfg.train.seed))
    # Batches stay on the CPU as the data loader yields them (uint8 pixels); the step moves them, as in training.
    images = torch.randint(256, (cfg.train.batch_size, *image_shape), dtype=torch.uint8)
    labels = torch.randint(cfg.data.num_classes, (cfg.train.batch_size,))
    try:
        method.step(images, labels)  # so that the measured step starts with the optimizer's state in place
        with PeakMemory(device, baseline=(model, optimizer, images)) as meter:
            stats = method.step(images, labels)
    except torch.OutOfMemoryError:
        return None, {}
    return meter.peak_bytes, stats


def plan_budget(cfg: Config, image_shape: tuple[int, ...], device: torch.device | str, *,
                max_batch_size: int | None = None, processes: int | None = None) -> Plan:
    """Find the largest setting of ``cfg`` whose measured training-step peak fits ``cfg.memory.budget``.

    GD and GD-extended: the largest batch size up to ``max_batch_size``. PatchGD: the largest batch size
    at the configured sampling; if not even batch 1 fits, the largest ``k`` below the configured one at
    batch 1, keeping ``max_sampled`` (so ``ζ`` grows). On CUDA the process is first capped at the budget,
    so trials, and the training after them, run under it. The caller's random state is left as it was.

    Args:
        cfg: The run's configuration; ``memory.budget`` must be set.
        image_shape: ``(C, H, W)`` of one training image.
        device: Where training will run.
        max_batch_size: Largest batch size to consider (default ``cfg.train.batch_size``).
        processes: Data-parallel processes that will train, each on its own device with this budget and
            batch (default: those of the current process group, 1 alone).

    Returns:
        The :class:`Plan`; ``plan.apply(cfg)`` is the config to train with.

    Raises:
        BudgetError: If even batch 1 (with ``k = 1`` for PatchGD) exceeds the budget.
        ValueError: If ``memory.budget`` is unset or unreadable.
    """
    if cfg.memory.budget is None:
        raise ValueError("memory.budget is not set: give a size such as '4GB'")
    try:
        budget = parse_size(cfg.memory.budget)
    except ValueError as e:
        raise ValueError(f"memory.budget: {e}") from None
    device = torch.device(device)
    capped = cap_cuda_memory(budget, device)
    patchgd = cfg.method == "patchgd"
    rows, cols = grid_shape(image_shape[-2], image_shape[-1], cfg.model.patch_size)
    trials: list[Trial] = []
    measured: dict[tuple[int, float | None], tuple[int | None, dict]] = {}

    def fits(batch_size: int, sampling: float | None) -> bool:
        setting = _setting(cfg, batch_size, sampling)
        peak, _ = measured[batch_size, sampling] = _measure(setting, image_shape, device)
        k = train.patches_per_step(setting, image_shape) // batch_size if patchgd else None
        trials.append(Trial(batch_size, k, peak))
        return peak is not None and peak <= budget

    sampling = cfg.patchgd.sampling if patchgd else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch_size = _largest_fitting(lambda b: fits(b, sampling), max_batch_size or cfg.train.batch_size)
        if patchgd and batch_size == 0 and trials[0].patches_per_image > 1:
            k = _largest_fitting(lambda k: fits(1, k / (rows * cols)), trials[0].patches_per_image - 1)
            if k:
                batch_size, sampling = 1, k / (rows * cols)
    if batch_size == 0:
        smallest = trials[-1]  # both searches try their smallest setting first and stop when it fails
        what = f"{cfg.method}, batch 1" + (", k 1" if patchgd else "")
        peak = "peak (out of memory)" if smallest.peak_bytes is None else \
            f"peak {format_size(smallest.peak_bytes)}"
        raise BudgetError(f"memory budget {format_size(budget)} is below the smallest feasible {peak} "
                          f"({what}); raise memory.budget or use a smaller model/image")
    peak, stats = measured[batch_size, sampling]
    return Plan(method=cfg.method, budget_bytes=budget, batch_size=batch_size, sampling=sampling,
                patches_per_image=stats.get("patches_per_image"), num_cells=rows * cols if patchgd else None,
                inner_iterations=stats.get("inner_iterations"), peak_bytes=peak, trials=trials, device=device,
                capped=capped, processes=processes or distributed.world_size())


def plan_from_config(cfg: Config, device: torch.device | str | None = None, processes: int | None = None) -> Plan:
    """:func:`plan_budget` for the shape of ``cfg``'s own training images, on ``device`` (default
    ``train.device``), for ``processes`` data-parallel processes: what ``patchgd plan`` prints."""
    train_set, _ = train.build_datasets(cfg)
    device = train.resolve_device(cfg.train.device) if device is None else device
    return plan_budget(cfg, tuple(train_set[0][0].shape), device, processes=processes)
