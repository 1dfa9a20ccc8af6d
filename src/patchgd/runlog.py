"""What a run tells its user: progress, a log file in the run directory and optional TensorBoard events.

One :class:`RunLogger` per run is the only thing the training loop writes messages and numbers through, so
that a process that must stay quiet (a non-zero rank under ``torchrun``) is silenced in one place:
``RunLogger(run_dir, enabled=False)``. On a terminal progress is a tqdm bar; otherwise (a file, a pipe, a
batch job) it is one plain line every ``every`` steps, without carriage returns.

Example:
    >>> logger = RunLogger("runs/demo", tensorboard=True, echo=print)
    >>> logger.log("epoch 1 done")
    epoch 1 done
    >>> logger.scalars({"loss/train": 0.7, "lr": 1e-3}, step=1)
    >>> logger.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["LOG_FILE", "RunLogger", "Progress", "open_summary_writer"]

LOG_FILE = "train.log"


def open_summary_writer(folder: Path):
    """A TensorBoard ``SummaryWriter`` writing into ``folder``; a clear error when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("train.tensorboard: true needs the tensorboard package: pip install "
                           "'patchgd[tensorboard]' (or set train.tensorboard: false)") from None
    return SummaryWriter(log_dir=str(folder))


class Progress:
    """Iterate over ``iterable`` showing progress: a tqdm bar on a terminal, else a line every ``every`` steps.

    Args:
        iterable: What to iterate over.
        desc: What is progressing (``"epoch 3"``).
        total: Number of steps (default ``len(iterable)``).
        every: Steps between plain lines when not on a terminal.
        write: Where plain lines go.
        terminal: Whether output is a terminal (default: ``sys.stderr.isatty()``).
        unit: What one step is (``"batch"``, ``"patch"``).
    """

    def __init__(self, iterable: Iterable, desc: str, *, total: int | None = None, every: int = 10,
                 write: Callable[[str], None] = print, terminal: bool | None = None, unit: str = "it") -> None:
        self.iterable, self.desc, self.every, self.write, self.unit = iterable, desc, every, write, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.info: dict[str, str] = {}
        self.bar = tqdm(total=self.total, desc=desc, leave=False, dynamic_ncols=True, unit=unit) \
            if self.terminal else None
        self.count, self.started = 0, time.perf_counter()

    def set_info(self, **values: Any) -> None:
        """Values shown beside the count (``loss="0.4321"``)."""
        self.info = {k: str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.info, refresh=False)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps (for progress that is not an iteration, e.g. patches encoded)."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.count // self.every != (self.count - n) // self.every or self.count == self.total:
            of = f"/{self.total}" if self.total is not None else ""
            info = "".join(f"  {k} {v}" for k, v in self.info.items())
            self.write(f"{self.desc}: {self.count}{of} {self.unit}{info}  ({time.perf_counter() - self.started:.1f}s)")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLogger:
    """Progress lines, the run's log file and TensorBoard, behind one object.

    Args:
        run_dir: The run directory; ``train.log`` is appended to there, and TensorBoard events go to
            ``run_dir/tensorboard``.
        tensorboard: Write TensorBoard event files.
        enabled: False makes every method a no-op (e.g. on non-zero ranks).
        echo: Where lines are shown besides the file (default ``print``).
        every: Steps between plain progress lines when not on a terminal (``train.log_every``).
    """

    def __init__(self, run_dir: str | Path | None, *, tensorboard: bool = False, enabled: bool = True,
                 echo: Callable[[str], None] = print, every: int = 10) -> None:
        self.enabled, self.echo, self.every = enabled, echo, every
        self.file = self.writer = None
        if not enabled or run_dir is None:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / LOG_FILE).open("a", encoding="utf-8")
        if tensorboard:
            self.writer = open_summary_writer(run_dir / "tensorboard")

    def log(self, message: str, *, show: bool = True) -> None:
        """Append ``message``, time-stamped, to the log file, and show it unless ``show`` is False."""
        if not self.enabled:
            return
        if show:
            self.echo(message)
        if self.file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.file.write("".join(f"{stamp}  {line}\n" for line in message.splitlines()))
            self.file.flush()

    def progress(self, iterable: Iterable, desc: str, **kwargs: Any) -> Iterable:
        """``iterable`` with progress shown (:class:`Progress`), or as it is when disabled."""
        if not self.enabled:
            return iterable
        return Progress(iterable, desc, every=kwargs.pop("every", self.every), write=self.log, **kwargs)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars ``{tag: value}`` at ``step`` (nothing without TensorBoard)."""
        if self.enabled and self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        """A TensorBoard image (a ``(C, H, W)`` tensor or array in [0, 1]) at ``step``."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats=dataformats)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
