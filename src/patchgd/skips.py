"""``data.on_error: skip``: a run that goes on past the images it cannot read, and says which.

An image can fail at three points, each handled where it happens:

* opening it, when the data set is built: it leaves the data set
  (:attr:`~patchgd.data.datasets.ImageDataset.excluded`), for every epoch;
* reading it in the loader (a tissue mask's thumbnail, a whole image): the dataset gives a
  :class:`~patchgd.data.errors.Skipped` stand-in, which :func:`drop_skipped` takes out of the batch;
* decoding a tile during a step (the fill reads every cell an inner iteration reads): the step stops with
  a :class:`~patchgd.data.errors.DataError` naming the file, and :func:`run_skipping` runs it again without
  that image, from the model's buffers as they were (a fill stopped half-way has moved BatchNorm's running
  statistics) - an update is never applied twice: if the optimizer had stepped, the rest of the step is
  dropped instead (under torchrun, where the processes' all-reduces would no longer pair up, the run
  stops).

:class:`SkipLog` records each skip (epoch, 0 for a file left out of the data set; split; file, level, grid
cells, the decoder's message) in the run log and ``skipped.csv``, and stops the run, the list written, when
more than ``data.max_skipped`` of the training images were skipped.
Under torchrun the records of all processes are gathered at the end of each epoch, so every process
takes the same decision and rank 0 writes them all.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import distributed
from .data.datasets import collate_images
from .data.errors import DataError, Skipped
from .data.lazy import LazyImage
from .io import atomic_file

__all__ = ["SkipLog", "drop_skipped", "run_skipping"]



def drop_skipped(images: torch.Tensor | list, labels: torch.Tensor) -> tuple[torch.Tensor | list, torch.Tensor,
                                                                             list[Skipped]]:
    """The batch without its :class:`Skipped` stand-ins, and those: the rest batched again by
    :func:`~patchgd.data.datasets.collate_images` (images in memory of one shape stacked)."""
    if isinstance(images, torch.Tensor):
        return images, labels, []
    skipped = [item for item in images if isinstance(item, Skipped)]
    if not skipped:
        return images, labels, []
    keep = [i for i, item in enumerate(images) if not isinstance(item, Skipped)]
    if not keep:
        return [], labels[:0], skipped
    images, _ = collate_images([(images[i], 0) for i in keep])
    return images, labels[keep], skipped  # a label row (a cached fill's (class, index)) stays whole


def _failing(err: DataError, images: Sequence) -> int | None:
    """Which image of ``images`` the error names (its ``path`` field; its message is for people), or None."""
    for i, item in enumerate(images):
        if isinstance(item, LazyImage) and str(item.source.path) == err.path:
            return i
    return None


def run_skipping(run: Callable, images: torch.Tensor | list, labels: torch.Tensor, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None):
    """``run(images, labels)``; when it fails on a tile of one of the images, again without that image.

    The second attempt starts from the buffers and random states the first started from, so it is exactly
    the step (evaluation) that the batch without the image would have been.

    Args:
        run: The step (or evaluation) of a batch.
        images: The batch: a tensor, or one item per image.
        labels: Its labels.
        model: Whose buffers are put back before a second attempt.
        optimizer: Whose steps tell whether the failed attempt had updated the weights already.
        generator: The step's own random generator (the cell sampler's), put back too.

    Returns:
        ``(result, images, labels, skipped)``: ``run``'s result (None when no image was left, or the
        attempt had updated the weights), the images and labels it ran on and the :class:`Skipped` records.

    Raises:
        DataError: The error names none of the batch's images.
    """
    skipped = []
    while True:
        if len(images) == 0:
            return None, images, labels, skipped
        lazy = not isinstance(images, torch.Tensor) and any(isinstance(x, LazyImage) for x in images)
        if not lazy:  # nothing is read during the call: nothing to catch
            return run(images, labels), images, labels, skipped
        buffers = [b.detach().clone() for b in model.buffers()]
        states = _random_states(generator)
        steps = []
        handle = optimizer.register_step_post_hook(lambda *_: steps.append(1)) if optimizer is not None else None
        try:
            return run(images, labels), images, labels, skipped
        except DataError as err:
            index = _failing(err, images)
            if index is None:
                raise
            item = images[index]
            note = f"; the step's first {len(steps)} update(s) were kept, its rest dropped" if steps else ""
            skipped.append(Skipped.of(item.source.path, err, item.source.level, note))
            if steps:
                if distributed.world_size() > 1:  # the processes' all-reduces would no longer pair up
                    raise
                return None, images, labels, skipped
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
            _restore_random_states(states, generator)
            keep = [i for i in range(len(images)) if i != index]
            images, labels = [images[i] for i in keep], labels[keep]
        finally:
            if handle is not None:
                handle.remove()


def _random_states(generator: torch.Generator | None) -> tuple:
    """torch's CPU and CUDA random states (dropout) and ``generator``'s."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, None if generator is None else generator.get_state()


def _restore_random_states(states: tuple, generator: torch.Generator | None) -> None:
    cpu, cuda, own = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None:
        generator.set_state(own)


class SkipLog:
    """Every image a run skipped: logged as it happens, checked and written at the end of each epoch.

    ``data.max_skipped`` is a share of the training images: those that cannot be opened, and each epoch's
    that cannot be read. Validation images are listed but not counted (they train nothing). Every check
    writes the list before it stops a run.

    Args:
        max_fraction: ``data.max_skipped``.
        excluded: Training files that could not be opened when the data sets were built (skipped every
            epoch).
        excluded_val: Validation files that could not be opened.
        path: The list, ``skipped.csv`` in the run directory.
        log: Where each skip is reported (the run log).
    """

    def __init__(self, max_fraction: float, excluded: Sequence[Skipped] = (), excluded_val: Sequence[Skipped] = (),
                 *, path: Path | None = None, log: Callable = print):
        self.max_fraction = max_fraction
        self.path = path
        self.log = log
        self.rows: list[dict] = []
        self.excluded = list({s.path: s for s in excluded}.values())
        self._epoch: list[Skipped] = []
        for item in self.excluded:
            self._add(item, epoch=0, split="train")
        for item in {s.path: s for s in excluded_val if s.path not in {e.path for e in self.excluded}}.values():
            self._add(item, epoch=0, split="val")

    def _add(self, item: Skipped, epoch: int, split: str) -> None:
        self.rows.append({"epoch": epoch, "split": split, "file": item.path,
                          "level": "" if item.level is None else item.level, "cells": item.cells or "",
                          "message": item.message})
        left = "leaves the data set" if epoch == 0 else f"leaves epoch {epoch} ({split})"
        said = item.message.removeprefix(f"{item.path}: ")  # the reader's message names the file too
        self.log(f"skipped {item.path}: {said} - it {left}")

    def record(self, items: Sequence[Skipped], epoch: int, split: str) -> None:
        """Log ``items`` skipped in ``epoch`` (``split``: ``"train"`` or ``"val"``)."""
        for item in items:
            self._add(item, epoch, split)
            if split == "train":
                self._epoch.append(item)

    def check_data(self, images: int) -> None:
        """Stop before training when more than ``max_fraction`` of the training files could not even be
        opened (``images``: those that could).

        Raises:
            DataError: Naming the count, the share and the first file; the list is written first.
        """
        first = self.excluded[0] if self.excluded else None
        self._stop_if(len(self.excluded), images + len(self.excluded), "could not be opened",
                      f"; the first: {first.path}: {first.message.removeprefix(f'{first.path}: ')}" if first else "")

    def end_epoch(self, epoch: int, images: int) -> None:
        """Check the epoch's training skips of every process against ``max_fraction`` and start the next
        epoch's count.

        Args:
            epoch: The epoch that ended.
            images: Training images this process's loader gave in it (skipped ones included).

        Raises:
            DataError: More than ``max_fraction`` of the epoch's images were skipped (on every process).
        """
        counts = distributed.gather_objects((len({s.path for s in self._epoch}), images))
        self._epoch = []
        self._stop_if(sum(c for c, _ in counts) + len(self.excluded), sum(n for _, n in counts) + len(self.excluded),
                      f"could not be read in epoch {epoch}")

    def _stop_if(self, skipped: int, total: int, what: str, first: str = "") -> None:
        """Write the list; then stop when ``skipped`` of ``total`` training images is too many."""
        if self.path is not None:
            self.write(self.path)
        if total and skipped / total > self.max_fraction:
            listed = f"; every file and why: {self.path}" if self.path is not None else ""
            raise DataError(f"{skipped} of {total} training images ({skipped / total:.1%}) {what}, more than "
                            f"data.max_skipped={self.max_fraction}{first}{listed}")

    def write(self, path: Path) -> None:
        """Write every process's records so far into ``path`` (rank 0 writes; the others only send)."""
        rows = [row for part in distributed.gather_objects(self.rows) for row in part]
        if not distributed.is_main():
            return
        unique = list({tuple(r.values()): r for r in rows}.values())
        with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "split", "file", "level", "cells", "message"])
            writer.writeheader()
            writer.writerows(unique)
