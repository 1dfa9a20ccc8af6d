"""patchgd sweep: four points over two CPU slots, killed mid-way and resumed, ending with a complete table."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from patchgd.cli import main
from patchgd.config import ConfigError
from patchgd import sweep as sweep_module
from patchgd.sweep import read_spec

from helpers import write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ultramnist"
    assert main(["generate", "ultramnist", str(out), "--train", "12", "--val", "6", "--image-size", "64",
                 "--seed", "1"]) == 0
    return out


def write_spec(tmp_path, data, **extra):
    config = write_config(tmp_path, data, train__epochs=2)
    spec = {"base": str(config), "set": ["train.log_every=1"],
            "grid": {"patchgd.sampling": [0.25, 0.5], "patchgd.max_sampled": [0.5, 1.0]}, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_a_killed_sweep_resumes_and_ends_with_a_complete_table(tmp_path, data):
    spec, out = write_spec(tmp_path, data), tmp_path / "sweep"
    command = [sys.executable, "-m", "patchgd", "sweep", str(spec), "--out", str(out), "--devices", "cpu",
               "--slots", "2"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "status").glob("*.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the runs it started, mid-way
    first.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "status").glob("*.json")}
    assert 1 <= len(done_before) < 4

    assert main(["sweep", str(spec), "--out", str(out), "--devices", "cpu", "--slots", "2"]) == 0
    for name, mtime in done_before.items():  # finished points were not run again
        assert (out / "status" / name).stat().st_mtime_ns == mtime, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["patchgd.sampling"], r["patchgd.max_sampled"]) for r in rows] == [("0.25", "0.5"), ("0.25", "1.0"), ("0.5", "0.5"),
                                                                 ("0.5", "1.0")]
    for row in rows:
        assert row["status"] == "done" and 0 <= float(row["best_val_accuracy"]) <= 1
        assert int(row["best_epoch"]) in (1, 2) and int(row["peak_memory_bytes"]) > 0
        metrics = list(csv.DictReader(open(os.path.join(row["run_dir"], "metrics.csv"))))
        assert [m["epoch"] for m in metrics] == ["1", "2"]  # killed runs resumed, not restarted twice over
    table = (out / "results.md").read_text()
    assert table.count("| done |") == 4 and "best_val_accuracy" in table


def test_a_failing_point_is_reported_and_the_others_run(tmp_path, data, capsys):
    spec = write_spec(tmp_path, data, grid={"model.patch_size": [32, 512]})  # 512 px patches of 64 px images
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--devices", "cpu"]) == 1
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "failed"]
    status = json.loads((tmp_path / "sweep" / "status" / f"{rows[1]['point']}.json").read_text())
    assert status["returncode"] == 2 and "patch_size=512" in status["error"]


def test_a_bad_point_is_refused_before_anything_runs(tmp_path, data):
    spec = write_spec(tmp_path, data, grid={"train.lr": [1e-3, -1]})
    with pytest.raises(ConfigError, match="point 001-lr=-1: .*train.lr"):
        read_spec(spec)
    assert not (tmp_path / "sweep").exists()


def test_a_terminated_sweep_stops_its_runs_and_starts_no_more(tmp_path, data):
    spec, out = write_spec(tmp_path, data), tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "patchgd", "sweep", str(spec), "--out", str(out), "--devices",
                              "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / "logs").glob("*.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)  # the sweep alone, as `kill PID` or a scheduler would
    assert sweep.wait(timeout=60) != 0

    def runs_alive():
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(out).encode() in cmdline.read_bytes():
                    alive.append(cmdline.parent.name)
            except OSError:
                pass
        return alive

    deadline = time.monotonic() + 30
    while runs_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not runs_alive()
    assert len(list((out / "logs").glob("*.log"))) == 1  # nothing was started after the signal
    statuses = [json.loads(p.read_text())["status"] for p in (out / "status").glob("*.json")]
    assert statuses in ([], ["interrupted"])


def test_a_stop_taken_by_a_worker_thread_still_stops_the_run_at_once(tmp_path, data):
    # The kernel may hand a process's SIGTERM to any thread; aimed at the thread waiting on the run, the
    # Python handler runs only when the main thread wakes: it must wake by itself, not when the run ends.
    spec, out = write_spec(tmp_path, data), tmp_path / "sweep"

    def kill_worker():
        deadline = time.monotonic() + 120
        while not sweep_module._RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = next(t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor"))
        signal.pthread_kill(worker.ident, signal.SIGTERM)

    threading.Thread(target=kill_worker, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        sweep_module.run_sweep(spec, out, devices=["cpu"], log=lambda line: None)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(list((out / "logs").glob("*.log"))) == 1
    statuses = [json.loads(p.read_text())["status"] for p in (out / "status").glob("*.json")]
    assert statuses == ["interrupted"]  # killed by the stop, not left to finish
