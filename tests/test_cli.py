"""The command line end to end on tiny data: generate -> train -> evaluate -> predict -> resume, and bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchgd.checkpoint import load_checkpoint
from patchgd.cli import main
from patchgd.config import load_config

from helpers import write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("data") / "ultramnist"
    assert main(["generate", "ultramnist", str(out), "--train", "16", "--val", "10", "--image-size", "96",
                 "--digits", str(mnist_dir), "--seed", "1"]) == 0
    return out


def copy_data(data, tmp_path):
    """A private copy of the data set, to break without harming the other tests."""
    import shutil

    return Path(shutil.copytree(data, tmp_path / "data"))


def metrics_epochs(run):
    return [int(row["epoch"]) for row in csv.DictReader((run / "metrics.csv").open())]


def test_train_evaluate_predict_and_resume(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    for name in ("config.yaml", "metrics.csv", "best.pt", "last.pt", "eval.json", "learning_curves.png"):
        assert (run / name).is_file(), name
    assert metrics_epochs(run) == [1]
    capsys.readouterr()

    assert main(["evaluate", str(run / "best.pt"), "--data", str(data), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert 0 <= results["accuracy"] <= 1 and len(results["confusion"]) == 10
    assert sum(map(sum, results["confusion"])) == 10

    images = sorted((data / "val").glob("*.png"))[:2]
    assert main(["predict", str(run / "last.pt"), *map(str, images), "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in predictions] == list(map(str, images))
    for p in predictions:
        assert abs(sum(p["probabilities"]) - 1) < 1e-4 and p["class"] == max(range(10), key=p["probabilities"].__getitem__)
    # Python users get what the command gets: the logits of model(image) from the checkpoint, independently.
    import patchgd

    model, cfg = patchgd.load_model(run / "last.pt")
    assert patchgd.predict(model, cfg, images) == predictions
    state = load_checkpoint(run / "last.pt")
    with torch.inference_mode():
        rebuilt = patchgd.create_model("patchgd", cfg.model.backbone, 10, patch_size=cfg.model.patch_size,
                                       latent_dim=cfg.model.latent_dim, in_chans=1, head_width=cfg.model.head_width,
                                       mean=cfg.data.mean, std=cfg.data.std)
        rebuilt.load_state_dict(state["model"])
        pixels = torch.from_numpy(np.array(Image.open(images[0])))[None]
        probs = torch.softmax(rebuilt.eval()(pixels[None]), dim=1)[0]
    assert predictions[0]["probabilities"] == pytest.approx(probs.tolist(), abs=1e-5)

    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert metrics_epochs(run) == [1, 2]


@pytest.mark.parametrize("method", ["patchgd", "gd"])
def test_a_resumed_run_continues_exactly_where_it_stopped(tmp_path, data, monkeypatch, method):
    import patchgd.engine.loop
    import patchgd.engine.trainer

    runs = {}
    for name in ("straight", "interrupted"):
        (tmp_path / name).mkdir()
        runs[name] = tmp_path / name / "run"
        config = write_config(tmp_path / name, data, train__epochs=2)
        args = ["train", "--config", str(config), "--set", f"method={method}"]
        if name == "interrupted":
            real_epoch = patchgd.engine.loop.train_one_epoch

            def crash_in_epoch_2(method_, loader, scheduler, epoch, measure_step, **kwargs):
                if epoch == 2:
                    raise KeyboardInterrupt
                return real_epoch(method_, loader, scheduler, epoch, measure_step, **kwargs)

            monkeypatch.setattr(patchgd.engine.trainer, "train_one_epoch", crash_in_epoch_2)
            with pytest.raises(KeyboardInterrupt):
                main(args)
            monkeypatch.undo()
            assert metrics_epochs(runs[name]) == [1]
            args = ["train", "--resume", str(runs[name])]
        assert main(args) == 0
    a, b = (load_checkpoint(runs[name] / "last.pt") for name in ("straight", "interrupted"))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    rows = [list(csv.DictReader((runs[name] / "metrics.csv").open())) for name in runs]
    for row_a, row_b in zip(*rows):
        assert {k: row_a[k] for k in ("epoch", "lr", "train_loss", "val_loss")} == \
            {k: row_b[k] for k in ("epoch", "lr", "train_loss", "val_loss")}


def test_training_twice_into_one_directory_is_refused(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def break_missing_image(root):
    (root / "train" / "train_000003.png").unlink()
    return "train_000003"


def break_label_column(root):
    text = (root / "train.csv").read_text().replace("image_id,label", "image_id,target", 1)
    (root / "train.csv").write_text(text)
    return "no label column"


def break_label_range(root):
    lines = (root / "train.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",12"
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return "label 12"


def break_png(root):
    (root / "train" / "train_000000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return "train_000000.png"


@pytest.mark.parametrize("breaker", [break_missing_image, break_label_column, break_label_range, break_png])
def test_bad_data_is_a_clear_error_and_leaves_no_checkpoint(tmp_path, data, capsys, breaker):
    root = copy_data(data, tmp_path)
    expected = breaker(root)
    assert main(["train", "--config", str(write_config(tmp_path, root))]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("args, expected", [
    (["--set", "model.patch_size=128"], "model.patch_size=128 is larger than the 96x96 images"),
    (["--set", "train.epoch=3"], "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    (["--set", "train.epochs=ten"], "train.epochs"),
    (["--set", "data.root=/nonexistent/place"], "/nonexistent/place"),
])
def test_bad_config_is_a_clear_error(tmp_path, data, capsys, args, expected):
    assert main(["train", "--config", str(write_config(tmp_path, data)), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_under_torchrun_an_error_names_the_rank_that_failed(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", str(write_config(tmp_path, data)), "--set", "train.epoch=3"]) == 2
    assert capsys.readouterr().err.startswith("patchgd train (rank 1 of 2): error: ")


@pytest.mark.parametrize("argv, expected", [
    (["train", "--config", "CONFIG", "--set", "train.epoch=3"], "unknown key 'train.epoch'"),
    (["train", "--config", "CONFIG", "--set", "data.root=/nonexistent/place"], "data.root /nonexistent/place"),
    (["train", "--config", "CONFIG", "--set", "model.init_backbone=/no/best.pt"], "model.init_backbone /no/best.pt"),
    (["train", "--config", "CONFIG", "--set", "data.level=1", "--set", "data.mpp=0.5"],
     "data.level=1 and data.mpp=0.5: give one"),
    (["plan", "--config", "CONFIG", "--set", "patchgd.fill=cached", "--set", "augment.flip=true"],
     "patchgd.fill=cached and augment.*"),
    (["evaluate", "/no/run/best.pt", "--data", "DATA"], "checkpoint /no/run/best.pt does not exist"),
    (["predict", "/no/run/best.pt", "x.png"], "checkpoint /no/run/best.pt does not exist"),
])
def test_first_errors_come_before_torch_is_imported(tmp_path, data, argv, expected):
    # A typo in a key or a path is reported without loading torch and timm (seconds), in a fresh process.
    argv = [str(write_config(tmp_path, data)) if a == "CONFIG" else str(data) if a == "DATA" else a for a in argv]
    code = ("import sys; from patchgd.cli import main; code = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 2 and expected in done.stderr
    assert done.stdout.strip() == "False"


def test_python_m_patchgd_is_the_command():
    done = subprocess.run([sys.executable, "-m", "patchgd", "train", "--help"], capture_output=True, text=True,
                          check=True)
    assert "--resume" in done.stdout


def test_sync_batchnorm_on_the_cpu_is_a_clear_error(tmp_path, data, capsys):
    assert main(["train", "--config", str(write_config(tmp_path, data)), "--set", "train.sync_batchnorm=true",
                 "--set", "train.device=cpu"]) == 2
    assert "train.sync_batchnorm=true needs CUDA devices" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_generate_refuses_to_overwrite_and_checkpoint_errors_are_clear(tmp_path, data, capsys):
    assert main(["generate", "ultramnist", str(data), "--train", "10", "--val", "10", "--image-size", "96"]) == 2
    assert "already exists" in capsys.readouterr().err
    not_a_checkpoint = tmp_path / "x.pt"
    torch.save([1, 2], not_a_checkpoint)
    assert main(["predict", str(not_a_checkpoint), "img.png"]) == 2
    assert "not a patchgd checkpoint" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for command in (["generate", "ultramnist"], ["prepare", "panda"], ["stats"], ["train"], ["evaluate"],
                    ["predict"], ["inspect"], ["plan"], ["demo"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: patchgd" in capsys.readouterr().out


def test_plan_shows_the_batch_that_fits_the_budget(tmp_path, data, capsys):
    # 48 px patches: test_resnet's last map stays 2 x 2, so BatchNorm works even for a single patch.
    config = write_config(tmp_path, data, model__patch_size=48)
    assert main(["plan", "--config", str(config), "--budget", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "budget" in out and "chose batch 4" in out  # 4 = train.batch_size, the upper bound
    assert main(["plan", "--config", str(config), "--budget", "1KB"]) == 2
    assert "below the smallest feasible peak" in capsys.readouterr().err


def test_demo_pretrains_then_trains_and_again_into_new_runs(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--train", "12", "--val", "6", "--image-size", "128",
            "--pretrain-epochs", "1", "--set", "train.epochs=1", "--set", "train.batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Megapixel MNIST, 12 / 6 images of 128 px (scikit-learn" in out and "chance is 0.100" in out
    assert "backbone from " + str(tmp_path / "pretrain" / "best.pt") in out
    heatmap = next((tmp_path / "run" / "heatmaps" / "epoch001").glob("*_heatmap.png"))
    assert f"evidence per cell of a validation image: {heatmap}" in out
    assert (tmp_path / "run" / "learning_curves.png").is_file() and (tmp_path / "run" / "best.pt").is_file()
    used = load_config(tmp_path / "run" / "config.yaml")
    assert used.model.init_backbone == str(tmp_path / "pretrain" / "best.pt") and used.model.head == "attention"
    pretrain = load_config(tmp_path / "pretrain" / "config.yaml")
    assert pretrain.method == "gd" and pretrain.data.num_classes == 11
    assert main(args) == 0  # the data and the cells are reused, the runs are new
    assert (tmp_path / "run-2" / "metrics.csv").is_file() and (tmp_path / "pretrain-2" / "best.pt").is_file()
    assert main([*args, "--pretrain-epochs", "0", "--out", str(tmp_path / "scratch")]) == 0
    assert "backbone from random weights" in capsys.readouterr().out


def test_prepare_panda_then_stats_then_train_on_a_fold(tmp_path, capsys):
    import numpy as np
    import tifffile

    src = tmp_path / "panda"
    (src / "train_images").mkdir(parents=True)
    rows = ["image_id,isup_grade"]
    for i in range(8):
        tifffile.imwrite(src / "train_images" / f"s{i}.tiff", np.full((40, 70, 3), 30 * i, np.uint8))
        rows.append(f"s{i},{i % 2}")
    (src / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "panda_64"
    assert main(["prepare", "panda", str(src), str(out), "--size", "64", "--folds", "2"]) == 0
    assert sorted(p.name for p in (out / "train_images").iterdir()) == [f"s{i}.png" for i in range(8)]
    capsys.readouterr()

    assert main(["stats", str(out / "train_images"), "--in-chans", "3"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["mean"]) == len(stats["std"]) == 3

    config = write_config(tmp_path, out, data__val_csv=None, data__fold=0, data__train_dir="train_images",
                          data__num_classes=6, model__in_chans=3, data__mean=stats["mean"], data__std=stats["std"])
    assert main(["train", "--config", str(config)]) == 0
    assert metrics_epochs(tmp_path / "run") == [1]


def test_evaluate_runs_in_the_mixed_precision_the_run_evaluated_in(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path, data, train__amp="bf16"))]) == 0
    logged = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run / "last.pt"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(logged["loss"], rel=1e-6)
