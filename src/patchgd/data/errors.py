"""The error raised for bad data: a file whose content is not what the code expects; and the stand-in for
an item that could not be read, when a run skips such items."""

from dataclasses import dataclass


class DataError(ValueError):
    """A data file exists but its content is invalid (bad header, column, label or image)."""


@dataclass(frozen=True)
class Skipped:
    """An item that could not be read, standing in for its image (``data.on_error: skip``): the file, its
    pyramid level (None when unknown) and the reader's message."""

    path: str
    message: str
    level: int | None = None
