"""A run directory held by one run at a time, without leftovers of interrupted writes.

:func:`hold_run_dir` creates the folder (with clear errors when it cannot), takes an exclusive lock on its
lock file for the life of the run (``filelock``: ``flock`` on Unix, ``msvcrt`` locking on Windows; the
operating system releases it when the process ends, however it ends), writes the holder's pid, host and
start time into a holder file beside it so that a second run can name it, refuses to start a fresh run
over an old run's files, and removes the temporary files that :func:`patchgd.io.atomic_file` leaves when a
process is killed mid-write.

The lock is advisory and local to one machine's kernel: it keeps two runs on one host apart; on a network
file system shared by several hosts it may not (NFS emulates ``flock`` per host).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

__all__ = ["BEST_CHECKPOINT", "CONFIG_FILE", "CURVES_FILE", "EVAL_FILE", "HOLDER_NAME", "LAST_CHECKPOINT", "LOCK_NAME",
           "METRICS_FILE",
           "RUN_FILES", "ROC_FILE", "CONFUSION_FILE", "RunInUseError", "SKIPPED_FILE", "SPLIT_FILE", "TEST_FILE",
           "TEST_PREDICTIONS_FILE", "hold_run_dir"]

LOCK_NAME = ".patchgd.lock"
# Who holds the lock (pid, host, start), beside the lock file: a locked file cannot be written on Windows.
HOLDER_NAME = ".patchgd.holder"
# What a run writes after its first epoch; config.yaml alone (a run that never finished an epoch) is no
# run to protect and is simply rewritten.
# The files of a run directory, named here only.
CONFIG_FILE = "config.yaml"  # the resolved config
SPLIT_FILE = "split.csv"  # which image trained and which validated
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.csv"  # one row per epoch
EVAL_FILE = "eval.json"  # the last epoch's evaluation (last.pt's), with its confusion matrix and best.pt's epoch
CURVES_FILE = "learning_curves.png"
SKIPPED_FILE = "skipped.csv"  # images left out with data.on_error: skip
ROC_FILE = "roc.png"  # of eval.json's evaluation; "test_" + it of test.json's
CONFUSION_FILE = "confusion.png"  # likewise
TEST_FILE = "test.json"  # best.pt on the test set, at the end of the run, with intervals
TEST_PREDICTIONS_FILE = "test_predictions.csv"  # its one row per image
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_FILE, EVAL_FILE, CURVES_FILE)


class RunInUseError(RuntimeError):
    """Another process holds the run directory."""


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, *, fresh: bool, log=print) -> Iterator[Path]:
    """Hold ``run_dir`` for the duration of the block.

    Args:
        run_dir: The run directory; created if missing.
        fresh: A new run: refuse a folder that holds another run's files (see :data:`RUN_FILES`).
        log: Where to report removed temporary files.

    Raises:
        RunInUseError: Another process holds the folder; the message names its pid, host and start time.
        FileExistsError: ``fresh`` and the folder holds a run.
        NotADirectoryError: The path, or a folder above it, is a file.
        PermissionError: The folder cannot be created or written.
    """
    run_dir = Path(run_dir)
    _make_dir(run_dir)
    lock_path = run_dir / LOCK_NAME
    lock = filelock.FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = (run_dir / HOLDER_NAME).read_text(errors="replace").strip()
        except OSError:
            holder = ""
        raise RunInUseError(f"{run_dir} is in use by another patchgd run ({holder or 'holder unknown'}); wait for "
                            "it to end or choose another output_dir") from None
    except OSError as err:
        raise PermissionError(f"output_dir {run_dir} is not writable ({err.strerror})") from None
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        (run_dir / HOLDER_NAME).write_text(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
        if fresh:
            existing = [name for name in RUN_FILES if (run_dir / name).exists()]
            if existing:
                raise FileExistsError(f"{run_dir} already holds a run ({', '.join(existing)}); resume it with "
                                      f"--resume {run_dir} or choose another output_dir")
        # Holding the lock, no other patchgd process is writing here: any temporary file is an orphan.
        for tmp in sorted(run_dir.glob(".*.tmp")):
            tmp.unlink()
            log(f"removed {tmp}, left by an interrupted write")
        yield run_dir
    finally:
        (run_dir / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()


def _make_dir(run_dir: Path) -> None:
    """``mkdir -p`` with errors that say which path is in the way."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [*reversed(run_dir.parents), run_dir] if p.exists() and not p.is_dir())
        raise NotADirectoryError(f"output_dir {run_dir} cannot be created: {blocker} is a file, not a folder") from None
    except PermissionError as err:
        raise PermissionError(f"output_dir {run_dir} cannot be created ({err.strerror}: {err.filename})") from None
    except OSError as err:
        raise OSError(f"output_dir {run_dir} cannot be created ({err.strerror})") from None
