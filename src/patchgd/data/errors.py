"""The error raised for bad data: a file whose content is not what the code expects; the stand-in for an
item that could not be read, when a run skips such items; and tifffile's own warnings, kept for them."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class DataError(ValueError):
    """A data file exists but its content is invalid (bad header, column, label or image).

    Where a reader knows them, the error carries them as data: ``path`` (the file), ``level`` (the pyramid
    level it read) and ``cells`` (where it failed: the grid cells, or the region). An error raised again
    from a DataLoader worker keeps only its message, which names them too.
    """

    def __init__(self, message: str, *, path: str | None = None, level: int | None = None,
                 cells: str | None = None):
        super().__init__(message)
        self.path, self.level, self.cells = path, level, cells


@dataclass(frozen=True)
class Skipped:
    """An item that could not be read, standing in for its image (``data.on_error: skip``): the file, the
    reader's message, its pyramid level and where it failed (None when unknown)."""

    path: str
    message: str
    level: int | None = None
    cells: str | None = None

    @classmethod
    def of(cls, path, err: Exception, level: int | None = None, note: str = "") -> Skipped:
        """The record of ``path`` failing with ``err``; its level and cells as the error gives them
        (``level`` where it gives none)."""
        given = getattr(err, "level", None)
        return cls(str(path), f"{err}{note}", level if given is None else given, getattr(err, "cells", None))


class _Collect(logging.Handler):
    def __init__(self, records: list[str]):
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextlib.contextmanager
def tifffile_warnings() -> Iterator[list[str]]:
    """Collect tifffile's own log warnings while a file is read, instead of letting Python print them on
    stderr beside (and apart from) the one error that names the file; the caller adds them to it."""
    logger = logging.getLogger("tifffile")
    records: list[str] = []
    handler, propagate = _Collect(records), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def keeps_tifffile_warnings(function: Callable) -> Callable:
    """``function`` with tifffile's warnings collected (:func:`tifffile_warnings`) and, when it raises a
    :class:`DataError`, added to its one line; when it succeeds they are dropped (tifffile recovered)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with tifffile_warnings() as warnings:
            try:
                return function(*args, **kwargs)
            except DataError as err:
                if not warnings:
                    raise
                said = "; ".join(dict.fromkeys(warnings))
                raise DataError(f"{err} (tifffile: {said})", path=err.path, level=err.level,
                                cells=err.cells) from err

    return wrapper
