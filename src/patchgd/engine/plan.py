"""Memory-budget planner: the largest training setting whose measured peak fits ``memory.budget``.

The paper's "4 GB" columns mean "the largest batch that fits in 4 GB". The planner finds it by running
real training steps (built by the run setup of :mod:`patchgd.engine.setup`, as ``fit`` builds them, on random
images of the training shape) and measuring each with :class:`~patchgd.memory.PeakMemory`, as
:func:`~patchgd.engine.trainer.fit` measures its steps. GD and
GD-extended trade batch size only, or, with ``train.micro_batch_size`` set, keep the batch and trade the
micro-batch of their gradient accumulation; PatchGD first trades batch size, then, at batch 1, the patches
per inner iteration ``k`` (its ``sampling``, or ``patches_per_step`` when that sets ``k``).

Which peak the budget bounds: on CUDA the device peak (what the caching allocator held, the memory the
GPU must have; the allocator is also capped at the budget), on the CPU the tensor peak of the step
(:class:`~patchgd.memory.PeakMemory`), since the process's RSS also holds the interpreter and libraries
and its high-water mark cannot be reset between trials; it is reported beside it.

Example:
    >>> plan = plan_budget(cfg, image_shape=(3, 512, 512), device="cpu")  # doctest: +SKIP
    >>> print(plan.describe())  # doctest: +SKIP
    >>> cfg = plan.apply(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import distributed
from ..config import Config
from ..registry import patch_method
from ..grid import grid_shape
from ..memory import PeakMemory, cap_cuda_memory, format_size, parse_size, process_peak
from .build import build_model, patches_per_step, resolve_device, resolve_weights
from .data import build_datasets, resolve_classes
from .setup import build_training
from .state import restore_rng_states, rng_states

__all__ = ["BudgetError", "Plan", "Trial", "plan_budget", "plan_from_config"]


class BudgetError(ValueError):
    """Not even the smallest setting of the method fits the memory budget."""


class Trial(NamedTuple):
    """One measured setting: batch size, PatchGD's ``k`` (None for GD), tensor peak (None: out of CUDA
    memory), the process-level peak beside it (:func:`~patchgd.memory.process_peak`: the device peak on
    CUDA, the process's peak RSS so far on the CPU) and GD's micro-batch (None: the whole batch)."""

    batch_size: int
    patches_per_image: int | None
    peak_bytes: int | None
    process_bytes: int | None = None
    micro_batch_size: int | None = None

    def budgeted_bytes(self, device: torch.device) -> int | None:
        """The peak the budget bounds on ``device`` (see the module's docstring)."""
        return self.process_bytes if device.type == "cuda" else self.peak_bytes


@dataclasses.dataclass
class Plan:
    """The chosen setting, with every trial that led to it.

    Attributes:
        method: ``cfg.method``.
        budget_bytes: The budget in bytes.
        batch_size: The chosen batch size.
        sampling: PatchGD's chosen sampling fraction (None for GD).
        patches_per_step: PatchGD's chosen absolute ``k`` when the config sets ``k`` that way, else None.
        patches_per_image: PatchGD's ``k`` per inner iteration (None for GD).
        num_cells: PatchGD's cells per image ``m * n`` (None for GD).
        inner_iterations: PatchGD's ``ζ`` under the chosen sampling (None for GD).
        peak_bytes: Measured tensor peak of the chosen setting.
        trials: Every measured setting, in the order tried.
        device: Where the trials ran.
        capped: Whether the CUDA allocator was capped at the budget.
        processes: Data-parallel processes the plan is for: the budget and the batch are per process
            (each has its own device), the global batch is ``processes`` times the batch.
        micro_batch_size: GD's chosen micro-batch when ``train.micro_batch_size`` is set, else None.
        notes: More lines for :meth:`describe` (the Z store of a cached fill).
    """

    method: str
    budget_bytes: int
    batch_size: int
    sampling: float | None
    patches_per_step: int | None
    patches_per_image: int | None
    num_cells: int | None
    inner_iterations: int | None
    peak_bytes: int
    trials: list[Trial]
    device: torch.device
    capped: bool
    processes: int = 1
    micro_batch_size: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """A short table of the trials and the choice."""
        cap = "allocator capped at the budget" if self.capped else "no allocator cap; steps measured"
        process, bounded = ("device peak", "device peak") if self.device.type == "cuda" else \
            ("process peak RSS", "tensor peak")
        lines = [f"memory plan: {self.method} on {self.device}, budget {format_size(self.budget_bytes)} on the "
                 f"{bounded} ({cap})",
                 f"  {'batch':>5}  {'micro':>5}  {'k':>4}  {'tensor peak':>11}  {process:>16}  fits"]
        for t in self.trials:
            peak = "out of mem" if t.peak_bytes is None else format_size(t.peak_bytes)
            other = "-" if t.process_bytes is None else format_size(t.process_bytes)
            fits = "yes" if self._fits(t) else "no"
            lines.append(f"  {t.batch_size:>5}  {t.micro_batch_size or '-':>5}  {t.patches_per_image or '-':>4}  "
                         f"{peak:>11}  {other:>16}  {fits}")
        choice = f"chose batch {self.batch_size}"
        if self.micro_batch_size is not None:
            choice += (f" in micro-batches of {self.micro_batch_size} (gradients of "
                       f"{-(-self.batch_size // self.micro_batch_size)} accumulate per update)")
        if self.patches_per_step is not None:
            choice += (f", k {self.patches_per_image} of {self.num_cells} cells (patches_per_step), "
                       f"ζ {self.inner_iterations}")
        elif self.sampling is not None:
            choice += (f", k {self.patches_per_image} of {self.num_cells} cells (sampling {self.sampling:.4g}, "
                       f"ζ {self.inner_iterations})")
        lines.append(f"{choice}: tensor peak {format_size(self.peak_bytes)}")
        if self.processes > 1:
            lines.append(f"budget, batch and peak are per process: {self.processes} processes train a global "
                         f"batch of {self.batch_size * self.processes} (train.batch_size stays per process)")
        configured_k = self.trials[0].patches_per_image
        if configured_k is not None and self.patches_per_image < configured_k:
            lines.append(f"k lowered from {configured_k} with max_sampled kept: each batch takes more inner "
                         "iterations (ζ) of fewer patches")
        return "\n".join(lines + self.notes)

    def _fits(self, trial: Trial) -> bool:
        budgeted = trial.budgeted_bytes(self.device)
        return budgeted is not None and budgeted <= self.budget_bytes

    def apply(self, cfg: Config) -> Config:
        """``cfg`` with the chosen batch size (and PatchGD sampling or patches_per_step), as a new Config."""
        cfg = _setting(cfg, self.batch_size, None, 1, self.micro_batch_size)
        return dataclasses.replace(cfg, patchgd=dataclasses.replace(
            cfg.patchgd, sampling=self.sampling or cfg.patchgd.sampling, patches_per_step=self.patches_per_step))


def _setting(cfg: Config, batch_size: int, k: int | None, num_cells: int, micro_batch_size: int | None = None) -> Config:
    """``cfg`` with another batch size (and GD micro-batch, unless None) and, unless None, PatchGD's ``k``
    (as ``patches_per_step`` when the config sets that, else as the sampling fraction ``k / num_cells``)."""
    train_change = {"batch_size": batch_size} | ({"micro_batch_size": micro_batch_size} if micro_batch_size else {})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_change))
    if k is not None:
        change = {"patches_per_step": k} if cfg.patchgd.patches_per_step is not None else {"sampling": k / num_cells}
        cfg = dataclasses.replace(cfg, patchgd=dataclasses.replace(cfg.patchgd, **change))
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


def _measure(cfg: Config, image_shape: tuple[int, ...], device: torch.device) -> tuple[int | None, int | None, dict]:
    """Tensor peak, process-level peak and stats of one training step of ``cfg`` after a warm-up step,
    everything built as :func:`~patchgd.engine.trainer.fit` builds it; ``(None, None, {})`` if a capped CUDA
    device ran out of memory."""
    # Built as the run builds it (seeded alike, so every trial starts from the same weights), in this process
    # alone; weights change no memory.
    training = build_training(cfg, device, weights=False, processes=False)
    model, optimizer, method = training.model, training.optimizer, training.method
    # Batches stay on the CPU as the data loader yields them (uint8 pixels); the step moves them, as in training.
    images = torch.randint(256, (cfg.train.batch_size, *image_shape), dtype=torch.uint8)
    labels = torch.randint(cfg.data.num_classes, (cfg.train.batch_size,))
    try:
        method.step(images, labels)  # so that the measured step starts with the optimizer's state in place
        with PeakMemory(device, baseline=(model, optimizer, images)) as meter:
            stats = method.step(images, labels)
    except torch.OutOfMemoryError:
        return None, None, {}
    return meter.peak_bytes, process_peak(device)[1], stats


def plan_budget(cfg: Config, image_shape: tuple[int, ...], device: torch.device | str, *,
                max_batch_size: int | None = None, processes: int | None = None,
                log: Callable[[str], None] | None = None) -> Plan:
    """Find the largest setting of ``cfg`` whose measured training-step peak fits ``cfg.memory.budget``.

    GD and GD-extended: the largest batch size up to ``max_batch_size``; with ``train.micro_batch_size``
    set, the batch stays ``train.batch_size`` and the largest micro-batch up to the configured one is
    chosen. PatchGD: the largest batch size
    at the configured ``k``; if not even batch 1 fits, the largest ``k`` below the configured one at
    batch 1, keeping ``max_sampled`` (so ``ζ`` grows). On CUDA the process is first capped at the budget,
    so trials, and the training after them, run under it. The caller's random state is left as it was.

    Args:
        cfg: The run's configuration; ``memory.budget`` must be set and ``data.num_classes`` known.
        image_shape: ``(C, H, W)`` of one training image.
        device: Where training will run.
        max_batch_size: Largest batch size to consider (default ``cfg.train.batch_size``).
        processes: Data-parallel processes that will train, each on its own device with this budget and
            batch (default: those of the current process group, 1 alone).
        log: Receives one line per trial as it is measured (trials of large images take minutes).

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
    patchgd = patch_method(cfg.method)
    rows, cols = grid_shape(image_shape[-2], image_shape[-1], cfg.model.patch_size)
    trials: list[Trial] = []
    measured: dict[tuple[int, int | None, int | None], tuple[int | None, int | None, dict]] = {}
    process_name = process_peak(device)[0]

    micro = not patchgd and cfg.train.micro_batch_size is not None

    def fits(batch_size: int, k: int | None, micro_batch_size: int | None = None) -> bool:
        setting = _setting(cfg, batch_size, k, rows * cols, micro_batch_size)
        started = time.perf_counter()
        peak, process, _ = measured[batch_size, k, micro_batch_size] = _measure(setting, image_shape, device)
        k = patches_per_step(setting, image_shape) // batch_size if patchgd else None
        trial = Trial(batch_size, k, peak, process, micro_batch_size)
        trials.append(trial)
        budgeted = trial.budgeted_bytes(device)
        if log is not None:
            what = "out of memory" if peak is None else \
                f"tensor peak {format_size(peak)}, {process_name} {format_size(process)}"
            log(f"memory plan: trial {len(trials)}: batch {batch_size}" + (f", k {k}" if k else "") +
                (f", micro-batch {micro_batch_size}" if micro_batch_size else "") +
                f": {what} ({time.perf_counter() - started:.1f}s)")
        return budgeted is not None and budgeted <= budget

    saved = rng_states(torch.Generator())  # the trials seed as a run does; the caller's states come back
    try:
        k = micro_batch_size = None
        if micro:
            batch_size = max_batch_size or cfg.train.batch_size
            micro_batch_size = _largest_fitting(lambda m: fits(batch_size, None, m),
                                                min(cfg.train.micro_batch_size, batch_size)) or None
            batch_size = batch_size if micro_batch_size else 0
        else:
            batch_size = _largest_fitting(lambda b: fits(b, None), max_batch_size or cfg.train.batch_size)
        if patchgd and batch_size == 0 and trials[0].patches_per_image > 1:
            k = _largest_fitting(lambda k: fits(1, k), trials[0].patches_per_image - 1) or None
            batch_size = 1 if k else 0
    finally:
        restore_rng_states(saved, torch.Generator())
    if batch_size == 0:
        smallest = trials[-1]  # both searches try their smallest setting first and stop when it fails
        what = f"{cfg.method}, " + ("micro-batch 1" if micro else "batch 1") + (", k 1" if patchgd else "")
        peak = "peak (out of memory)" if smallest.budgeted_bytes(device) is None else \
            f"peak {format_size(smallest.budgeted_bytes(device))}"
        raise BudgetError(f"memory budget {format_size(budget)} is below the smallest feasible {peak} "
                          f"({what}); raise memory.budget or use a smaller model/image")
    peak, _, stats = measured[batch_size, k, micro_batch_size]
    chosen = _setting(cfg, batch_size, k, rows * cols).patchgd
    return Plan(method=cfg.method, budget_bytes=budget, batch_size=batch_size,
                sampling=chosen.sampling if patchgd else None,
                patches_per_step=chosen.patches_per_step if patchgd else None,
                patches_per_image=stats.get("patches_per_image"), num_cells=rows * cols if patchgd else None,
                inner_iterations=stats.get("inner_iterations"), peak_bytes=peak, trials=trials, device=device,
                capped=capped, processes=processes or distributed.world_size(), micro_batch_size=micro_batch_size)


def plan_from_config(cfg: Config, device: torch.device | str | None = None, processes: int | None = None,
                     log: Callable[[str], None] | None = None) -> Plan:
    """:func:`plan_budget` for the shape and classes of ``cfg``'s own training images, on ``device`` (default
    ``train.device``), for ``processes`` data-parallel processes: what ``patchgd plan`` prints."""
    train_set, val_set = build_datasets(cfg)
    cfg = resolve_weights(resolve_classes(cfg, train_set, val_set))
    device = resolve_device(cfg.train.device) if device is None else device
    plan = plan_budget(cfg, tuple(train_set[0][0].shape), device, processes=processes, log=log)
    if cfg.patchgd.fill == "cached":  # the store a cached run keeps, on top of the step's memory
        from .zcache import describe_store, store_layout

        layout = store_layout(cfg, build_model(cfg, weights=False), train_set)
        plan.notes.append(describe_store(cfg, layout, cfg.output_dir))
    return plan
