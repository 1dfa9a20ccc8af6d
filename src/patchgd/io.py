"""Files and folders that are either written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_directory"]


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it when the block succeeds.

    A reader (or a resumed run) never sees a half-written checkpoint, config or CSV: an interruption
    leaves the previous file intact and removes the temporary one.

    Args:
        path: The file to produce; its folder is created if needed.

    Example:
        >>> with atomic_file("runs/demo/notes.txt") as tmp:
        ...     _ = tmp.write_text("epoch 3")
        >>> Path("runs/demo/notes.txt").read_text()
        'epoch 3'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(err):
            free = shutil.disk_usage(path.parent).free
            raise OSError(f"cannot write {path}: the disk is full, or a quota or file-size limit was reached "
                          f"({free / 2**20:.1f} MiB free on its device); the previous {path.name}, if any, "
                          "is intact") from err
        raise


def _out_of_space(err: BaseException) -> bool:
    """Whether a write failed for lack of room: ENOSPC, EDQUOT or EFBIG from Python, or torch.save's
    C++ zip writer, which reports a short write as ``[enforce fail at inline_container.cc] ...`` (``file
    write failed`` or ``unexpected pos``) without the errno."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return isinstance(err, RuntimeError) and "inline_container.cc" in str(err)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out_dir`` when the block succeeds.

    Args:
        out_dir: The directory to produce.
        overwrite: Replace an existing non-empty ``out_dir``. The old one is renamed away before the
            new one is renamed in and only deleted afterwards, so a failure never loses both.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.

    Example:
        >>> with atomic_directory("out/set") as tmp:
        ...     _ = (tmp / "train.csv").write_text("image_id,label\\n")
        >>> sorted(p.name for p in Path("out/set").iterdir())
        ['train.csv']
    """
    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a data set is meant to be shared
        yield tmp
        # Checked again: another process may have created OUT while this one was generating.
        _check_target(out, overwrite)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"{out} exists and is not a directory; expected a directory path to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite on the "
                              "command line) to replace it")


def _replace(new: Path, out: Path) -> None:
    if not out.exists():
        new.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
