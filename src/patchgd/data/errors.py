"""The error raised for bad data: a file whose content is not what the code expects."""


class DataError(ValueError):
    """A data file exists but its content is invalid (bad header, column, label or image)."""
