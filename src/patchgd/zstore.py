"""A latent grid that persists across steps: every cell's code of every training image, and when it was
encoded (``patchgd.fill: cached``).

The store holds, per image, one row of ``width`` values per cell of the image's own grid (float16 by
default, float32 on request) and the step at which the cell was last encoded (-1: never). It lives in
memory (small data sets; saved inside the run's checkpoints) or on disk as memory-mapped NumPy files under
a folder (cohorts; any process of a ``torchrun`` group may read and write any image, each its own).

A run killed at any moment resumes bit-exactly: a store on disk keeps an undo journal per epoch
(``journal-E-rR.bin``: every row's previous value, appended before the row is written), so that the
writes made after the last checkpoint are undone when the run resumes from it (:meth:`ZStore.rewind`);
:meth:`ZStore.commit` drops the journal once the epoch's checkpoint is on disk.

Example:
    >>> store = ZStore.create([4, 6], width=3)
    >>> store.write(torch.tensor([1, 1]), torch.tensor([0, 5]), torch.ones(2, 3), step=7)
    >>> store.stamps(1).tolist()
    [7, -1, -1, -1, -1, 7]
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .io import atomic_file

__all__ = ["ZStore", "default_store_dir", "free_bytes", "store_bytes"]

DTYPES = {"float16": np.float16, "float32": np.float32}
LAYOUT_FILE = "layout.json"


def store_bytes(cells: Sequence[int], width: int, dtype: str = "float16") -> int:
    """Bytes of a store of ``cells`` cells per image and ``width`` values per cell (codes and stamps)."""
    total = int(sum(cells))
    return total * (width * np.dtype(DTYPES[dtype]).itemsize + 8)


class ZStore:
    """Per image, every cell's code and the step it was encoded at.

    Build one with :meth:`create` (or :meth:`open` an existing folder); images are the data set's indices
    ``0..N-1``, cells each image's own row-major grid cells.
    """

    def __init__(self, offsets: np.ndarray, codes: np.ndarray, stamps: np.ndarray, folder: Path | None, rank: int = 0):
        self.offsets, self.codes, self._stamps, self.folder, self.rank = offsets, codes, stamps, folder, rank
        self.width = codes.shape[1]
        self.epoch: int | None = None  # the epoch whose writes the journal undoes

    # --- building ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, cells: Sequence[int], width: int, dtype: str = "float16", folder: str | Path | None = None,
               rank: int = 0) -> ZStore:
        """A new store of ``cells[i]`` cells for image ``i``: in memory, or on disk in ``folder`` (created;
        under torchrun rank 0 creates it and the others :meth:`open` it)."""
        offsets = np.concatenate([[0], np.cumsum(np.asarray(cells, dtype=np.int64))])
        total = int(offsets[-1])
        if folder is None:
            return cls(offsets, np.zeros((total, width), DTYPES[dtype]), np.full(total, -1, np.int64), None)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        codes = np.lib.format.open_memmap(folder / "codes.npy", mode="w+", dtype=DTYPES[dtype], shape=(total, width))
        stamps = np.lib.format.open_memmap(folder / "stamps.npy", mode="w+", dtype=np.int64, shape=(total,))
        stamps[:] = -1
        stamps.flush()
        with atomic_file(folder / LAYOUT_FILE) as tmp:  # last: a folder without it is no store yet
            tmp.write_text(json.dumps({"cells": [int(c) for c in cells], "width": width, "dtype": dtype}))
        return cls(offsets, codes, stamps, folder, rank)

    @classmethod
    def open(cls, folder: str | Path, cells: Sequence[int], width: int, dtype: str, rank: int = 0) -> ZStore:
        """The store in ``folder``, checked against the layout the run expects.

        Raises:
            ValueError: The folder holds a store of other images, cells, width or dtype.
        """
        folder = Path(folder)
        layout = json.loads((folder / LAYOUT_FILE).read_text())
        expected = {"cells": [int(c) for c in cells], "width": width, "dtype": dtype}
        if layout != expected:
            differs = [k for k in expected if layout.get(k) != expected[k]]
            raise ValueError(f"{folder}: a Z store of another layout ({', '.join(differs)} differ: "
                             f"{ {k: layout.get(k) for k in differs} } in the folder, { {k: expected[k] for k in differs} } "
                             "for this run); give patchgd.store_dir another folder, or delete it")
        offsets = np.concatenate([[0], np.cumsum(np.asarray(cells, dtype=np.int64))])
        codes = np.load(folder / "codes.npy", mmap_mode="r+")
        stamps = np.load(folder / "stamps.npy", mmap_mode="r+")
        return cls(offsets, codes, stamps, folder, rank)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self._stamps.nbytes

    # --- reading and writing ---------------------------------------------------------------------------

    def rows_of(self, image: int, cells: torch.Tensor | np.ndarray) -> np.ndarray:
        """The store's rows of ``cells`` (own-grid indices) of ``image``."""
        return self.offsets[image] + np.asarray(cells, dtype=np.int64)

    def stamps(self, image: int) -> np.ndarray:
        """The step each cell of ``image`` was last encoded at (-1: never)."""
        return np.asarray(self._stamps[self.offsets[image]:self.offsets[image + 1]])

    def read(self, image: int) -> torch.Tensor:
        """``(cells, width)`` float32 codes of ``image``'s own grid."""
        return torch.from_numpy(np.asarray(self.codes[self.offsets[image]:self.offsets[image + 1]], dtype=np.float32))

    def write(self, images: torch.Tensor, cells: torch.Tensor, codes: torch.Tensor, step: int) -> None:
        """Store ``codes`` ``(N, width)`` (detached) of ``(image, own cell)`` pairs, encoded at ``step``; on
        disk, their previous values go to the epoch's journal first."""
        rows = self.offsets[images.cpu().numpy()] + cells.cpu().numpy().astype(np.int64)
        values = codes.detach().float().cpu().numpy().astype(self.codes.dtype)
        if self.folder is not None and self.epoch is not None:
            self._journal(rows)
        self.codes[rows] = values
        self._stamps[rows] = step

    # --- consistency with the checkpoints ------------------------------------------------------------

    def _journal_path(self, epoch: int, rank: int | None = None) -> Path:
        return self.folder / f"journal-{epoch}-r{self.rank if rank is None else rank}.bin"

    def _journal(self, rows: np.ndarray) -> None:
        """Append the previous values of ``rows`` to the epoch's journal (a record: count, rows, codes,
        stamps); a record cut short by a kill is ignored by :meth:`rewind`, and its rows were not written."""
        record = [np.array([len(rows)], np.int64), rows.astype(np.int64), np.ascontiguousarray(self.codes[rows]),
                  np.asarray(self._stamps[rows], np.int64)]
        with self._journal_path(self.epoch).open("ab") as f:
            for part in record:
                f.write(part.tobytes())
            f.flush()

    def begin_epoch(self, epoch: int) -> None:
        """Journal this process's writes of ``epoch`` from now on (a store on disk)."""
        self.epoch = epoch

    def commit(self, epoch: int) -> None:
        """The checkpoint of ``epoch`` is on disk: its writes stay; flush them and drop their journal."""
        if self.folder is None:
            return
        self.codes.flush()
        self._stamps.flush()
        for path in self.folder.glob(f"journal-{epoch}-r*.bin"):
            path.unlink(missing_ok=True)
        for path in self.folder.glob("journal-*-r*.bin"):  # older epochs: their checkpoints were written
            if int(path.name.split("-")[1]) < epoch:
                path.unlink(missing_ok=True)

    def rewind(self, epoch: int) -> int:
        """Undo every write made after the checkpoint of ``epoch`` (the journals of later epochs, newest
        record first); returns the rows restored. Journals of ``epoch`` or earlier belong to written
        checkpoints and are dropped."""
        restored = 0
        dtype, width = self.codes.dtype, self.width
        for path in sorted(self.folder.glob("journal-*-r*.bin")):
            if int(path.name.split("-")[1]) <= epoch:
                path.unlink()
                continue
            data, records, at = path.read_bytes(), [], 0
            while at + 8 <= len(data):
                n = int(np.frombuffer(data, np.int64, 1, at)[0])
                size = 8 + n * 8 + n * width * dtype.itemsize + n * 8
                if at + size > len(data):
                    break  # cut short by the kill: its rows were never written
                rows = np.frombuffer(data, np.int64, n, at + 8)
                codes = np.frombuffer(data, dtype, n * width, at + 8 + n * 8).reshape(n, width)
                stamps = np.frombuffer(data, np.int64, n, at + 8 + n * 8 + n * width * dtype.itemsize)
                records.append((rows, codes, stamps))
                at += size
            for rows, codes, stamps in reversed(records):
                self.codes[rows] = codes
                self._stamps[rows] = stamps
                restored += len(rows)
            path.unlink()
        self.codes.flush()
        self._stamps.flush()
        return restored

    def state_dict(self) -> dict:
        """A store in memory, for the checkpoint (a store on disk is its folder)."""
        if self.folder is not None:
            return {"folder": str(self.folder)}
        return {"codes": torch.from_numpy(self.codes.copy()), "stamps": torch.from_numpy(self._stamps.copy())}

    def load_state_dict(self, state: dict) -> None:
        if self.folder is not None:
            return
        self.codes[:] = state["codes"].numpy()
        self._stamps[:] = state["stamps"].numpy()

    def delete(self) -> None:
        """Remove a store's folder (a store in memory has none)."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def default_store_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its store on disk unless ``patchgd.store_dir`` says otherwise."""
    return Path(run_dir) / "zstore"
