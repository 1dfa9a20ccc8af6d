"""Fault injection on a real ``patchgd train`` process: SIGKILL during a checkpoint write and at a random
time mid-run, then resume; the final weights must equal an uninterrupted run's bit for bit and
``metrics.csv`` must hold each epoch once. Also: a second run into a folder a live run holds."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from patchgd.checkpoint import load_checkpoint
from patchgd.cli import main
from patchgd.rundir import HOLDER_NAME

EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("data") / "ultramnist"
    assert main(["generate", "ultramnist", str(out), "--train", "12", "--val", "4", "--image-size", "64",
                 "--digits", str(mnist_dir), "--seed", "3"]) == 0
    return out


def write_config(folder: Path, root: Path, train: dict | None = None, **patchgd) -> Path:
    # A wide head makes the checkpoint a few MB, so that its write lasts long enough to be caught.
    cfg = {"method": "patchgd", "output_dir": str(folder / "run"),
           "model": {"backbone": "test_resnet", "patch_size": 32, "latent_dim": 8, "in_chans": 1,
                     "head_width": 160},
           "data": {"root": str(root), "num_classes": 10},
           "train": {"epochs": EPOCHS, "batch_size": 3, "device": "cpu", "warmup_epochs": 0.5, **(train or {})},
           "patchgd": {"sampling": 0.5, **patchgd}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "config.yaml"


def start(config: Path, run: Path) -> subprocess.Popen:
    """``patchgd train`` in a new process: a fresh run, or a resume when ``last.pt`` exists."""
    args = ["--resume", str(run)] if (run / "last.pt").exists() else ["--config", str(config)]
    return subprocess.Popen([sys.executable, "-m", "patchgd.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(proc: subprocess.Popen, condition, timeout: float = 240.0) -> bool:
    """Poll ``condition()`` every half millisecond until it holds (True) or ``proc`` ends (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if condition():
            return True
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("patchgd train did not reach the awaited point")
        time.sleep(0.0005)
    return False


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def during_a_write_of_last_pt(run: Path):
    """While a new last.pt is being written: its temporary exists and last.pt is not yet replaced."""
    before = _mtime(run / "last.pt")
    return lambda: bool(list(run.glob(".last.pt.*.tmp"))) and _mtime(run / "last.pt") == before


def within_the_next_epoch(run: Path, delay: float):
    """``delay`` seconds after this process finished its first epoch, i.e. somewhere in the next one."""
    epochs_before, finished_at = _epochs(run), []

    def condition():
        if not finished_at and _epochs(run) > epochs_before:
            finished_at.append(time.monotonic())
        return bool(finished_at) and time.monotonic() - finished_at[0] > delay

    return condition


def test_sigkill_at_several_points_then_resume_gives_identical_weights(tmp_path, data, capsys):
    # The uninterrupted run. While it runs (each launch costs seconds of imports, so it doubles as the
    # live holder of a folder): a second run into its folder fails at once, naming it.
    straight = tmp_path / "straight" / "run"
    config = write_config(tmp_path / "straight", data)
    import patchgd.engine.trainer  # noqa: F401 - the second run must reach the lock in moments, not after its imports

    proc = start(config, straight)
    assert wait_for(proc, lambda: f"pid {proc.pid} " in _read(straight / HOLDER_NAME)), "ended before its lock was seen"
    assert main(["train", "--config", str(config)]) == 2
    assert proc.poll() is None, "the first run ended before the second started: nothing was tested"
    assert f"{straight} is in use by another patchgd run (pid {proc.pid} on host" in capsys.readouterr().err
    finish(proc)

    run = tmp_path / "killed" / "run"
    config = write_config(tmp_path / "killed", data)
    delays = random.Random(0)
    # At a random time in the epoch after the first (whatever it is doing then), then during a later
    # write of last.pt, an older one on disk, until one kill lands before the write ends (its temporary
    # file is left behind). Then resume to the end. Each launch costs seconds of imports: few kills.
    points = [lambda r: within_the_next_epoch(r, delays.uniform(0, 1))] + [during_a_write_of_last_pt] * 3
    killed, caught_mid_write = 0, False
    for point in points:
        if caught_mid_write:
            break
        proc = start(config, run)
        if not wait_for(proc, point(run)):
            break  # the run ended on its own before the point: nothing left to kill
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed += 1
        caught_mid_write = point is during_a_write_of_last_pt and bool(list(run.glob(".last.pt.*.tmp")))
    if not (run / "last.pt").exists() or load_checkpoint(run / "last.pt")["epoch"] < EPOCHS:
        finish(start(config, run))

    assert killed >= 2 and caught_mid_write, (killed, caught_mid_write)
    assert not list(run.glob(".*.tmp"))  # orphans of the killed writes were removed on start
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    rows = [list(csv.DictReader((r / "metrics.csv").open())) for r in (straight, run)]
    assert [r["epoch"] for r in rows[1]] == [str(e) for e in range(1, EPOCHS + 1)]
    columns = ("epoch", "lr", "train_loss", "val_loss", "val_accuracy")
    assert [{k: r[k] for k in columns} for r in rows[0]] == [{k: r[k] for k in columns} for r in rows[1]]
    assert load_checkpoint(run / "best.pt")["epoch"] == load_checkpoint(straight / "best.pt")["epoch"]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_cached_run_killed_mid_epoch_resumes_bit_identical(tmp_path, data, store):
    """A cached fill (refresh, a refill period) killed with SIGKILL in the middle of its second epoch, then
    resumed: the same weights, and the same store, as the run that was never killed."""
    options = {"fill": "cached", "refresh": 1, "refresh_epochs": 2, "store": store, "max_sampled": 0.5}
    runs = {}
    for name in ("straight", "killed"):
        config = write_config(tmp_path / name, data, train={"log_every": 1}, **options)
        run = tmp_path / name / "run"
        if name == "killed":
            proc = start(config, run)
            # after the second of epoch 2's four steps (train.log says so): its writes are in the store
            assert wait_for(proc, lambda: "epoch 2: 2/4 batch" in _read(run / "train.log")), "ended before the kill"
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            assert load_checkpoint(run / "last.pt")["epoch"] == 1
            if store == "disk":
                assert (run / "zstore" / "journal-2-r0.bin").stat().st_size > 0  # writes to undo
        finish(start(config, run))
        runs[name] = run
    a, b = (load_checkpoint(runs[name] / "last.pt") for name in ("straight", "killed"))
    assert a["epoch"] == b["epoch"] == EPOCHS
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    if store == "disk":
        import numpy as np

        for name in ("codes.npy", "stamps.npy"):
            assert np.array_equal(np.load(runs["straight"] / "zstore" / name), np.load(runs["killed"] / "zstore" / name))
    else:
        snapshots = [load_checkpoint(runs[name] / f"zstore-{EPOCHS}.pt") for name in ("straight", "killed")]
        assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in ("codes", "stamps"))
        assert [p.name for p in runs["killed"].glob("zstore-*.pt")] == [f"zstore-{EPOCHS}.pt"]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _epochs(run: Path) -> int:
    """Rows in metrics.csv: the epochs this process (or the checkpoint it resumed) finished."""
    try:
        return len((run / "metrics.csv").read_text().strip().splitlines()) - 1
    except OSError:
        return 0
