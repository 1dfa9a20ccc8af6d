"""Experiment sweeps: a base config and a grid (or list) of ``--set`` overrides, each point a normal run.

A spec (YAML)::

    base: panda_2048_patchgd          # a file relative to the spec's folder, or a packaged recipe's name
    set: [train.epochs=20]                                 # overrides for every point
    grid:                                                  # every combination of these values
      patchgd.sampling: [0.1, 0.2, 0.3]
    points:                                                # and/or an explicit list of points
      - {patchgd.sampling: 0.5, patchgd.max_sampled: 0.5}

Every point is ``patchgd train`` in its own process and run directory (``OUT/runs/NNN-key=value...``), queued
over the devices: one run per GPU at a time, or, on the CPU, ``slots`` runs side by side with the CPU's
threads split between them. A finished point writes ``OUT/status/NAME.json``; running the sweep again
skips finished points, resumes a killed run from its ``last.pt`` (``--resume``) and starts the rest anew,
so a killed sweep continues where it stopped (a sweep stopped by SIGTERM or Ctrl-C stops its runs
too). A point that fails is reported (its exit status and the end
of its log) and the others go on. At the end ``OUT/results.csv`` and ``OUT/results.md`` hold one row per
point: its overrides, status, best validation accuracy and kappa, the best epoch, the tensor peak and the
wall time.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, find_config, load_config, read_yaml
from .io import atomic_file
from .rundir import LAST_CHECKPOINT, METRICS_FILE

__all__ = ["Point", "read_spec", "run_sweep"]

SPEC_KEYS = ("base", "set", "grid", "points")
# The runs in progress: a sweep that is told to stop (SIGTERM) stops them too instead of leaving them behind.
_RUNNING: set[subprocess.Popen] = set()
RESULT_COLUMNS = ["point", "status", "best_val_accuracy", "best_val_qwk", "best_epoch", "peak_memory_bytes",
                  "wall_time_s", "run_dir"]


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its name and its overrides (``{dotted.key: value}``)."""

    name: str
    overrides: dict[str, Any]

    def set_args(self) -> list[str]:
        """The overrides as ``--set`` values (YAML, as the command line parses them)."""
        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in self.overrides.items()]


def _slug(overrides: dict[str, Any]) -> str:
    text = "-".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items())
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", text)[:80]


def read_spec(path: str | Path) -> tuple[Path, list[str], list[Point]]:
    """The base config, the common overrides and the points of a sweep spec, every point's config checked.

    Raises:
        ConfigError: The spec (an unknown key, no points, a grid that is no mapping of lists) or a
            point's config (naming the point) does not validate.
    """
    path = find_config(path)
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict) or "base" not in spec:
        raise ConfigError(f"{path}: expected a sweep spec with 'base' (a config file) and 'grid' and/or 'points'")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected {', '.join(SPEC_KEYS)}")
    base = path.parent / str(spec["base"])  # relative to the spec, or a packaged recipe's name
    base = (base if base.exists() else find_config(spec["base"])).resolve()
    common = [str(item) for item in spec.get("set") or []]
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid must map dotted keys to non-empty lists of values, got {grid!r}")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    listed = spec.get("points") or []
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise ConfigError(f"{path}: points must be a list of mappings of dotted keys to values")
    overrides = combos + [dict(p) for p in listed]
    if not overrides:
        raise ConfigError(f"{path}: no points: give a grid or a list of points")
    points = [Point(f"{i:03d}-{_slug(o)}", o) for i, o in enumerate(overrides)]
    for point in points:  # every point validates before anything runs
        try:
            load_config(base, [*common, *point.set_args()])
        except ConfigError as err:
            raise ConfigError(f"{path}: point {point.name}: {err}") from None
    return base, common, points


def _status(out: Path, point: Point) -> dict | None:
    path = out / "status" / f"{point.name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_point(base: Path, common: list[str], point: Point, out: Path, slot: str, threads: int | None,
               log, stopping: threading.Event) -> dict:
    """Run (or resume) one point in its own process on ``slot``; returns and records its status."""
    run_dir = out / "runs" / point.name
    env = dict(os.environ)
    if slot.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = slot.partition(":")[2] or "0"
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "patchgd", "train"]
    if (run_dir / LAST_CHECKPOINT).is_file():  # killed after an epoch: continue it, under the config it started with
        command += ["--resume", str(run_dir)]
    else:
        where = ["train.device=cuda"] if slot.startswith("cuda") else ["train.device=cpu", f"train.threads={threads}"]
        sets = [*common, *point.set_args(), f"output_dir={run_dir}", *where]
        command += ["--config", str(base), *itertools.chain.from_iterable(("--set", s) for s in sets)]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log(f"{point.name}: {'resuming' if '--resume' in command else 'starting'} on {slot}")
    started = time.perf_counter()
    with (out / "logs" / f"{point.name}.log").open("a") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        _RUNNING.add(process)
        if stopping.is_set():  # the stop came while this run was being started: it saw no process to end
            process.terminate()
        try:
            rc = process.wait()
        finally:
            _RUNNING.discard(process)
    outcome = "done" if rc == 0 else "interrupted" if rc < 0 else "failed"  # < 0: stopped by a signal
    status = {"point": point.name, "overrides": point.overrides, "status": outcome,
              "returncode": rc, "wall_time_s": round(time.perf_counter() - started, 1), "slot": slot,
              "run_dir": str(run_dir)}
    if rc != 0:
        lines = (out / "logs" / f"{point.name}.log").read_text(errors="replace").strip().splitlines()
        status["error"] = lines[-1] if lines else ""
    with atomic_file(out / "status" / f"{point.name}.json") as tmp:
        tmp.write_text(json.dumps(status, indent=2))
    log(f"{point.name}: {status['status']}" + (f" ({status['error']})" if rc else "") + f", {status['wall_time_s']} s")
    return status


def _summary(point: Point, status: dict | None, out: Path) -> dict:
    """A point's row of the results table, from its status and its run's metrics.csv."""
    row = {**point.overrides, "point": point.name, "status": (status or {}).get("status", "not run"),
           "wall_time_s": (status or {}).get("wall_time_s"), "run_dir": str(out / "runs" / point.name)}
    metrics = out / "runs" / point.name / METRICS_FILE
    if metrics.is_file():
        with metrics.open(newline="") as f:
            epochs = [r for r in csv.DictReader(f) if r["val_accuracy"]]  # the evaluated epochs
        if epochs:
            best = max(epochs, key=lambda r: float(r["val_accuracy"]))
            row.update(best_val_accuracy=float(best["val_accuracy"]), best_epoch=int(best["epoch"]),
                       best_val_qwk=max(float(r["val_qwk"]) for r in epochs),
                       peak_memory_bytes=max(int(float(r["peak_memory_bytes"])) for r in epochs))
    return row


def _write_results(out: Path, keys: list[str], rows: list[dict]) -> None:
    columns = [*keys, *RESULT_COLUMNS]
    with atomic_file(out / "results.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(column: str, value: Any) -> str:
        if value is None:
            return ""
        if column == "peak_memory_bytes":
            return f"{value / 2**20:.1f} MiB"
        return f"{value:.4f}" if column.startswith("best_val") else str(value)

    shown = [c for c in columns if c != "run_dir"]
    lines = ["| " + " | ".join(c.replace("_bytes", "") for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in shown) + " |" for row in rows]
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def run_sweep(spec: str | Path, out: str | Path, *, devices: list[str] | None = None, slots: int = 1,
              log=print) -> list[dict]:
    """Run every point of ``spec`` not finished yet, queued over ``devices``, and write the results table.

    Args:
        spec: The sweep spec (see the module docstring).
        out: The sweep folder: ``runs/``, ``logs/``, ``status/``, ``results.csv``, ``results.md``.
        devices: ``["cuda:0", "cuda:1"]`` (one run per GPU at a time) or ``["cpu"]``; default: every GPU
            torch sees, else the CPU.
        slots: Runs side by side on the CPU (its threads split between them); GPUs take one run each.
        log: Where progress lines go.

    Returns:
        The table's rows, one per point.
    """
    base, common, points = read_spec(spec)
    out = Path(out)
    if devices is None:
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    gpus = [d for d in devices if d.startswith("cuda")]
    if gpus and len(gpus) != len(devices) or any(d != "cpu" and not re.fullmatch(r"cuda(:\d+)?", d) for d in devices):
        raise ConfigError(f"--devices {' '.join(devices)}: expected GPUs (cuda:0 cuda:1 ...) or cpu")
    free: queue.Queue[str] = queue.Queue()
    for slot in gpus or ["cpu"] * slots:
        free.put(slot)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // slots)
    todo = [p for p in points if (_status(out, p) or {}).get("status") != "done"]
    log(f"sweep {spec}: {len(points)} points, {len(points) - len(todo)} done, {len(todo)} to run on "
        f"{', '.join(gpus) if gpus else f'{slots} CPU slot(s) of {threads} thread(s)'}")

    stopping = threading.Event()

    def work(point: Point) -> dict | None:
        slot = free.get()
        try:
            if stopping.is_set():  # told to stop: start nothing more
                return None
            return _run_point(base, common, point, out, slot, threads, log, stopping)
        finally:
            free.put(slot)

    stopped_by: list[int] = []

    # The handler only flags and terminates: an exception raised from it could land inside the executor's
    # locking and leave a worker blocked on a lock that is never released.
    def stop(signum, _frame):
        stopping.set()  # before the runs are listed: a run registered after the listing sees the flag
        stopped_by.append(signum)
        for process in list(_RUNNING):
            process.terminate()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        with ThreadPoolExecutor(max_workers=free.qsize()) as pool:
            futures = [pool.submit(work, point) for point in todo]
            # Waits with a timeout: the kernel may hand the signal to a worker thread, and Python runs the
            # handler only when the main thread wakes; an untimed wait would let the current run finish and
            # the next one start before the stop takes effect.
            while wait(futures, timeout=0.2).not_done:
                pass
            for future in futures:
                future.result()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped_by:
        raise SystemExit(128 + stopped_by[0])
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    rows = [_summary(p, _status(out, p), out) for p in points]
    _write_results(out, keys, rows)
    failed = [r["point"] for r in rows if r["status"] != "done"]
    log(f"wrote {out / 'results.csv'} and {out / 'results.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return rows
