"""Reliability and security (issue 9): safe checkpoints, loud divergence, honest resume, one run per folder,
write order, the last partial batch, and a clear one-line error (exit 2) on every bad-input path."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

import patchgd.engine.build
import patchgd.engine.loop
import patchgd.engine.state
import patchgd.engine.trainer
from patchgd.checkpoint import CheckpointError, load_checkpoint
from patchgd.cli import main
from patchgd.rundir import HOLDER_NAME, hold_run_dir

from helpers import write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("data") / "ultramnist"
    assert main(["generate", "ultramnist", str(out), "--train", "16", "--val", "6", "--image-size", "96",
                 "--digits", str(mnist_dir), "--seed", "2"]) == 0
    return out


def metrics_rows(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


def one_clear_line(err: str, command: str) -> str:
    """The error in the output (which may also hold progress bars): one line, no traceback."""
    line = err.strip().splitlines()[-1].strip()
    assert line.startswith(f"patchgd {command}: error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err, err
    return line


class CreatesAFile:
    """A pickled object that, when unpickled, runs a shell command creating a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path, cfg: dict) -> Path:
    """A checkpoint that looks right (model, config) but carries a payload."""
    torch.save({"model": {}, "config": cfg, "epoch": 1, "payload": CreatesAFile(marker)}, path)
    return path


def test_the_payload_of_a_malicious_checkpoint_runs_only_with_the_unsafe_loader(tmp_path):
    # The control: proves the payload works, so that its absence below means it was refused.
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker, {})
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_malicious_checkpoint_is_refused_by_all_four_entry_points(tmp_path, data, capsys):
    marker = tmp_path / "pwned"
    config = write_config(tmp_path, data)
    cfg = yaml.safe_load(config.read_text())
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker, cfg)
    image = str(next((data / "val").glob("*.png")))

    assert main(["evaluate", str(evil), "--data", str(data)]) == 2
    assert "refused by the safe loader" in one_clear_line(capsys.readouterr().err, "evaluate")
    assert main(["predict", str(evil), image]) == 2
    assert "refused by the safe loader" in one_clear_line(capsys.readouterr().err, "predict")

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    shutil.copy(evil, run / "last.pt")
    assert main(["train", "--resume", str(run)]) == 2
    assert "refused by the safe loader" in one_clear_line(capsys.readouterr().err, "train")

    assert main(["train", "--config", str(config), "--set", f"output_dir={tmp_path / 'run2'}",
                 "--set", f"model.init_backbone={evil}"]) == 2
    assert "refused by the safe loader" in one_clear_line(capsys.readouterr().err, "train")
    model = patchgd.engine.build.build_model(patchgd.config.config_from_dict(cfg))
    with pytest.raises(CheckpointError, match="evil.pt was refused by the safe loader"):
        patchgd.engine.build.init_backbone(model, evil)
    assert not marker.exists()


def test_a_trained_checkpoint_loads_whole_with_the_safe_loader(tmp_path, data):
    assert main(["train", "--config", str(write_config(tmp_path, data))]) == 0
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "rng", "config", "metrics", "epoch"} <= set(state)
        assert state["config"]["train"]["batch_size"] == 4 and [r["epoch"] for r in state["metrics"]] == [1]


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: shutil.copy(next(Path(__file__).parent.glob("*.py")), p), "is not a checkpoint"),
    (lambda p: None, "does not exist"),
    (lambda p: torch.save([1, 2], p), "not a patchgd checkpoint"),
    (lambda p: (torch.save({"model": {"w": torch.zeros(1000)}}, p),  # a copy cut short
                p.write_bytes(p.read_bytes()[:2000])), "is a truncated checkpoint (2000 bytes"),
])
def test_bad_checkpoint_files_are_one_clear_line(tmp_path, data, capsys, make, expected):
    path = tmp_path / "x.pt"
    make(path)
    assert main(["predict", str(path), "img.png"]) == 2
    line = one_clear_line(capsys.readouterr().err, "predict")
    assert str(path) in line and expected in line


def test_an_image_passed_as_a_checkpoint_is_one_clear_line(data, capsys):
    image = next((data / "val").glob("*.png"))
    assert main(["evaluate", str(image), "--data", str(data)]) == 2
    assert f"{image} is not a checkpoint" in one_clear_line(capsys.readouterr().err, "evaluate")
    with pytest.raises(CheckpointError):
        load_checkpoint(image)


def test_a_diverging_run_exits_non_zero_naming_epoch_step_and_value(tmp_path, data, capsys):
    assert main(["train", "--config", str(write_config(tmp_path, data, train__lr=1e10))]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert line.startswith("patchgd train: error: training diverged: ")
    assert "non-finite training loss nan at epoch 1, step" in line or \
        re.search(r"epoch 1, step \d+: parameter .* is not finite after the update", line), line
    assert line.endswith("no checkpoint was written")
    assert not any((tmp_path / "run" / name).exists() for name in ("last.pt", "best.pt", "metrics.csv"))


def test_divergence_in_a_later_epoch_keeps_the_last_finite_checkpoints(tmp_path, data, monkeypatch):
    real_epoch = patchgd.engine.loop.train_one_epoch

    def absurd_rate_in_epoch_2(method, loader, scheduler, epoch, measure_step, **kwargs):
        if epoch == 2:  # one absurd learning rate for the first step of epoch 2
            for group in method.optimizer.param_groups:
                group["lr"] = 1e30
        return real_epoch(method, loader, scheduler, epoch, measure_step, **kwargs)

    monkeypatch.setattr(patchgd.engine.trainer, "train_one_epoch", absurd_rate_in_epoch_2)
    cfg = patchgd.config.load_config(write_config(tmp_path, data, train__epochs=3, train__optimizer="sgd"))
    with pytest.raises(patchgd.engine.loop.DivergenceError, match=r"epoch 2, step [12][;:] .*keep epoch 1"):
        patchgd.engine.trainer.fit(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        assert state["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]


def test_non_finite_validation_outputs_never_make_a_best_checkpoint(tmp_path, data, monkeypatch):
    real_epoch = patchgd.engine.loop.train_one_epoch

    def poison_head_statistics_in_epoch_2(method, loader, scheduler, epoch, measure_step, **kwargs):
        stats = real_epoch(method, loader, scheduler, epoch, measure_step, **kwargs)
        if epoch == 2:  # eval mode uses running statistics: every validation logit becomes NaN
            bn = next(m for m in method.model.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("nan"))
        return stats

    monkeypatch.setattr(patchgd.engine.trainer, "train_one_epoch", poison_head_statistics_in_epoch_2)
    cfg = patchgd.config.load_config(write_config(tmp_path, data, train__epochs=2))
    with pytest.raises(patchgd.engine.loop.DivergenceError, match=r"epoch 2: 6 of 6 validation images got non-finite"):
        patchgd.engine.trainer.fit(cfg, log=lambda *_: None)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def nan_tiff(root: Path) -> Path:
    """Replace a training PNG with a float TIFF of the same size holding one NaN pixel."""
    png = sorted((root / "train").glob("*.png"))[5]
    pixels = np.full((96, 96), 0.5, np.float32)
    pixels[10, 20] = np.nan
    png.unlink()
    tifffile.imwrite(png.with_suffix(".tiff"), pixels)
    return png.with_suffix(".tiff")


@pytest.mark.parametrize("verify", ["header", "full"])
def test_a_nan_pixel_is_an_error_naming_the_file(tmp_path, data, capsys, verify):
    root = Path(shutil.copytree(data, tmp_path / "data"))
    bad = nan_tiff(root)
    config = write_config(tmp_path, root, data__verify=verify)
    assert main(["train", "--config", str(config)]) == 2
    # Float images are read (issue 11: data.intensity scales them); a NaN pixel is refused when the image
    # is read, a TIFF being opened for its header only at build time: before any checkpoint is written.
    assert f"{bad}: 1 non-finite pixel value(s) (nan or inf)" in one_clear_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resume_refuses_a_changed_config_and_config_yaml_stays_true(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.lr=0.5"]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert "train.lr: 0.001 in the checkpoint, 0.5 now" in line
    # --config beside --resume is read, and every differing key is listed.
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", data, train__batch_size=2, train__seed=7)
    assert main(["train", "--resume", str(run), "--config", str(other)]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert "train.batch_size: 4 in the checkpoint, 2 now" in line and "train.seed: 0 in the checkpoint, 7 now" in line
    assert main(["train", "--resume", str(run), "--set", "train.epochs=0"]) == 2  # out of range
    assert (run / "config.yaml").read_text() == saved
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]


def test_resume_refuses_a_lower_epoch_count_and_a_changed_data_set(tmp_path, data, capsys):
    root = Path(shutil.copytree(data, tmp_path / "data"))
    config = write_config(tmp_path, root, train__epochs=2)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[:-4]) + "\n")  # 12 images: 3 batches, not 4
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert "gives 3 batches per epoch (12 images) but gave 4" in line


def test_raising_epochs_stretches_the_schedule_from_the_current_step(tmp_path, data):
    config = write_config(tmp_path, data, train__epochs=1)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.epochs=3"]) == 0
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # 16 images in batches of 4: 4 steps per epoch, warm-up 0.5 epoch = 2 steps, 12 steps in all now.
    # The paper's decay from the peak 1e-3 to half of it at step 11, evaluated at steps 4 and 8:
    for row, step in zip(rows[1:], (4, 8)):
        expected = 1e-3 * (1 - 0.5 * (step - 2) / (12 - 1 - 2))
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-12)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3


def test_a_fresh_run_never_writes_into_an_old_runs_files(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch\n7\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "already holds a run (metrics.csv)" in one_clear_line(capsys.readouterr().err, "train")
    assert (run / "metrics.csv").read_text() == "epoch\n7\n"
    # A folder with only the config of a run that never finished an epoch is reused.
    (run / "metrics.csv").unlink()
    (run / "config.yaml").write_text("method: gd\n")
    assert main(["train", "--config", str(config)]) == 0
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "patchgd"


def test_a_held_run_directory_refuses_a_second_run_naming_the_holder(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    with hold_run_dir(tmp_path / "run", fresh=True):
        holder = (tmp_path / "run" / HOLDER_NAME).read_text()
        assert holder.startswith(f"pid {os.getpid()} on host ") and "started" in holder
        assert main(["train", "--config", str(config)]) == 2
        assert f"is in use by another patchgd run ({holder.strip()})" in capsys.readouterr().err
    assert main(["train", "--config", str(config)]) == 0  # released


def test_resume_removes_stale_temporaries_and_restores_metrics_and_best_from_the_checkpoint(tmp_path, data):
    config = write_config(tmp_path, data, train__epochs=2)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--set", "train.epochs=1"]) == 0
    orphans = [run / ".last.pt.k3j2.tmp", run / ".metrics.csv.x9.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a file")
    rows = metrics_rows(run)
    with (run / "metrics.csv").open("a") as f:  # a row for an epoch the checkpoint does not hold
        f.write("2,0.1,9,9,0,0,0,0\n")
    (run / "best.pt").unlink()  # as if killed between last.pt and its copy to best.pt
    patchgd.engine.state.restore_run_files(run, load_checkpoint(run / "last.pt"))  # what a resume does first
    assert (run / "best.pt").read_bytes() == (run / "last.pt").read_bytes()  # epoch 1 is the best so far
    assert metrics_rows(run) == rows
    with (run / "metrics.csv").open("a") as f:
        f.write("2,0.1,9,9,0,0,0,0\n")
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert not any(orphan.exists() for orphan in orphans)
    new_rows = metrics_rows(run)
    assert [r["epoch"] for r in new_rows] == ["1", "2"] and new_rows[0] == rows[0]
    assert new_rows[1]["train_loss"] != "9"


def test_a_last_batch_of_one_image_is_dropped_and_batchnorm_trains(tmp_path, data, capsys):
    # 16 images in batches of 5 leave one; a 3 x 3 grid at sampling 0.1 samples k = 1 patch, and
    # test_resnet's last map of a 32 px patch is 1 x 1: a single value per channel in BatchNorm.
    config = write_config(tmp_path, data, train__batch_size=5, patchgd__sampling=0.1)
    assert main(["train", "--config", str(config)]) == 0
    assert "last batch of one image: it is dropped" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["scheduler"]["last_epoch"] == 3 == state["steps_per_epoch"]  # 16 // 5 batches


def test_output_dir_below_a_file_is_one_clear_line(tmp_path, data, capsys):
    (tmp_path / "afile").write_text("x")
    config = write_config(tmp_path, data)
    assert main(["train", "--config", str(config), "--set", f"output_dir={tmp_path / 'afile' / 'run'}"]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line


def test_a_read_only_output_dir_is_one_clear_line(tmp_path, data, capsys):
    if os.geteuid() == 0:  # permissions do not bind root; sysfs refuses new folders to root too
        target = Path("/sys/patchgd-run")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = tmp_path / "ro" / "run"
    config = write_config(tmp_path, data)
    assert main(["train", "--config", str(config), "--set", f"output_dir={target}"]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert f"output_dir {target} cannot be created" in line and not target.exists()


def test_a_full_disk_is_one_clear_line_naming_the_file(tmp_path, data):
    # A real failed write: the file-size limit makes the checkpoint's write fail like a full disk does.
    config = write_config(tmp_path, data)
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); from patchgd.cli import main; "
              f"sys.exit(main(['train', '--config', {str(config)!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    err = "\n".join(line for line in proc.stderr.splitlines() if "patchgd train: error" in line)
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    assert f"cannot write {tmp_path / 'run' / 'last.pt'}: the disk is full" in one_clear_line(err, "train")
    assert not list((tmp_path / "run").glob(".*.tmp")) and not (tmp_path / "run" / "last.pt").exists()


def test_a_utf16_csv_and_duplicate_rows_are_one_clear_line_naming_the_file(tmp_path, data, capsys):
    root = Path(shutil.copytree(data, tmp_path / "data"))
    text = (root / "train.csv").read_text()
    (root / "train.csv").write_text(text, encoding="utf-16")
    config = write_config(tmp_path, root)
    assert main(["train", "--config", str(config)]) == 2
    assert f"{root / 'train.csv'}: not UTF-8 text (a UTF-16 file)" in one_clear_line(capsys.readouterr().err, "train")
    lines = text.splitlines()
    (root / "train.csv").write_text("\n".join([*lines, lines[3].rsplit(",", 1)[0] + ",9"]) + "\n")
    assert main(["train", "--config", str(config)]) == 2
    line = one_clear_line(capsys.readouterr().err, "train")
    assert f"{root / 'train.csv'}, lines 4 and {len(lines) + 1}: image" in line and "has two labels" in line


def test_generate_into_an_existing_folder_names_the_flag(data, capsys):
    assert main(["generate", "ultramnist", str(data), "--train", "2", "--val", "2", "--image-size", "64"]) == 2
    assert "--overwrite" in one_clear_line(capsys.readouterr().err, "generate")
