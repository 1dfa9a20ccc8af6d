"""Slide reading: write a synthetic slide, then read patches through OpenSlide and tifffile + zarr.

Prints the write's wall time, file size and peak RSS (in a child process), then patches per second of
each backend, reading 128 cells as whole-row strips (``read_cells``) and one cell at a time (``read``),
for a run of consecutive cells of one grid row and for cells scattered over the slide. The backends and
modes are interleaved (A B A B ..., the mode that goes first alternating) and the medians of the
repeats reported. The slide is deleted
afterwards unless ``--keep``.

    python benchmarks/slide_reading.py --size 100000 --out /tmp/synthetic-100k.tif
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="slide side in pixels")
    parser.add_argument("--out", default="/tmp/synthetic-slide.tif", help="where to write the slide")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--cells", type=int, default=128, help="cells per read")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the slide")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        write = _write(out, args.size)
        print(json.dumps(write))
        print(json.dumps(_read(out, args.patch_size, args.cells, args.repeats)))
    finally:
        if not args.keep:
            out.unlink(missing_ok=True)


def _write(out: Path, size: int) -> dict:
    code = ("import sys; from patchgd.data.prepare.synthetic import write_synthetic_slide; "
            "write_synthetic_slide(sys.argv[1], size=int(sys.argv[2]))")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(out), str(size)], check=True)
    return {"size_px": size, "write_s": round(time.perf_counter() - started, 1),
            "file_gb": round(out.stat().st_size / 1e9, 3),
            "write_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def _read(path: Path, p: int, n: int, repeats: int) -> dict:
    from patchgd.data.sources import OpenSlideSource, TiffSource

    backends = {"openslide": OpenSlideSource(path), "tifffile+zarr": TiffSource(path)}
    rows, cols = -(-backends["openslide"].height // p), -(-backends["openslide"].width // p)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {}
    for repeat in range(repeats):
        row = rng.integers(0, rows)
        start = rng.integers(0, max(1, cols - n))
        layouts = {
            "row": np.stack([np.full(n, row), start + np.arange(n)], 1),
            "scattered": np.stack([rng.integers(0, rows, n), rng.integers(0, cols, n)], 1),
        }
        for layout, cells in layouts.items():
            for name, source in backends.items():  # interleaved: A B A B
                # The mode that reads the cells first pays for cold tiles; alternate which one it is.
                for mode in ("read_cells", "per-cell read")[:: 1 if repeat % 2 else -1]:
                    started = time.perf_counter()
                    if mode == "read_cells":
                        source.read_cells(cells, p)
                    else:
                        for r, c in cells:
                            source.read(int(r) * p, int(c) * p, p, p)
                    times.setdefault(f"{name} {layout} {mode}", []).append(time.perf_counter() - started)
    return {"patch_size": p, "cells_per_read": n, "repeats": repeats,
            "patches_per_s": {k: round(n / statistics.median(v)) for k, v in times.items()}}


if __name__ == "__main__":
    main()
