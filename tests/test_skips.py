"""``data.on_error: skip`` on slides broken on purpose: a file that is not a slide, and tiles whose bytes are
truncated in a tifffile-written TIFF. A step run again without the broken slide equals the step on the
good slides alone; a run finishes its epochs and names the broken files; the threshold stops it."""

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
import yaml

import patchgd
from patchgd.cli import main
from patchgd.data.datasets import ImageCSVDataset
from patchgd.data.errors import DataError, Skipped
from patchgd.data.readers import open_source
from patchgd.data.lazy import LazyImage
from patchgd.skips import SkipLog, drop_skipped, run_skipping

from helpers import TinyEncoder
from slide_files import he_tile, write_pyramid_tiff

P = 32


def write_slide(path, shift=0):
    """H&E tissue on glass, 256 x 320 px, lossless tiles of 64 px (level 0: 4 x 5 tiles)."""
    canvas = np.full((256, 320, 3), 245, np.uint8)
    canvas[8:248, 40 + shift:280 + shift] = he_tile()
    write_pyramid_tiff(path, canvas, tile=64, levels=2, compression="zlib")
    return path


def truncate_tile(path, index=7):
    """Cut level 0's tile ``index`` (row 1, column 2: tissue) to 10 bytes, as a torn write leaves it."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        width = np.dtype(tifffile.TIFF.DATA_FORMATS[tag.dtype]).itemsize
        where = tag.valueoffset + index * width
    with open(path, "r+b") as f:
        f.seek(where)
        f.write((10).to_bytes(width, "little"))
    return path


def write_cohort(root, good=6, broken_tile=1, not_a_slide=1):
    """``root/train`` and ``root/val`` (two good slides), listed in CSVs; the broken ones in train."""
    rows = {"train": ["image_id,label"], "val": ["image_id,label"]}
    for split, count in (("train", good), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            write_slide(root / split / f"good{i}.tif", shift=i)
            rows[split].append(f"good{i},{i % 2}")
    for i in range(broken_tile):
        truncate_tile(write_slide(root / "train" / f"torn{i}.tif"))
        rows["train"].append(f"torn{i},{i % 2}")
    for i in range(not_a_slide):
        (root / "train" / f"junk{i}.tif").write_bytes(b"II*\x00" + b"\x17" * 500)  # a TIFF header, then junk
        rows["train"].append(f"junk{i},0")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_a_truncated_tile_is_a_data_error_naming_the_file_and_cells(tmp_path):
    path = truncate_tile(write_slide(tmp_path / "torn.tif"))
    source = open_source(path)  # the header is fine
    assert source.read_cells([(0, 0)], P).shape == (1, 3, P, P)  # tile 0 too
    with pytest.raises(DataError, match=r"torn.tif.*grid row 2, columns 4\.\.4"):
        source.read_cells([(2, 4)], P)  # 32 px cell (2, 4) lies in 64 px tile (1, 2)


def make_step(seed=0):
    torch.manual_seed(seed)
    model = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=2, patch_size=P, latent_dim=6,
                                      head_width=8, pad_value=245)
    return patchgd.PatchGD(model, torch.optim.Adam(model.parameters(), lr=1e-2), sampling=0.25,
                           generator=torch.Generator().manual_seed(3))


def test_a_step_run_again_without_a_broken_slide_equals_the_step_on_the_good_slides(tmp_path):
    good = [LazyImage(open_source(write_slide(tmp_path / f"g{i}.tif", shift=i))) for i in range(2)]
    torn = LazyImage(open_source(truncate_tile(write_slide(tmp_path / "torn.tif"))))
    skipping, plain = make_step(), make_step()
    torch.manual_seed(5)
    stats, images, labels, skipped = run_skipping(skipping.step, [good[0], torn, good[1]], torch.tensor([0, 1, 1]),
                                                  skipping.model, skipping.optimizer, skipping.generator)
    assert [s.path for s in skipped] == [str(tmp_path / "torn.tif")] and skipped[0].level == 0
    assert "grid row" in skipped[0].message and images == good and labels.tolist() == [0, 1]
    torch.manual_seed(5)
    expected = plain.step(good, torch.tensor([0, 1]))
    assert stats["loss"] == expected["loss"]
    for a, b in zip(skipping.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)  # weights and BatchNorm statistics: the failed fill left no trace


@pytest.mark.parametrize("workers", [0, 1])
def test_skipping_reads_the_errors_fields_not_their_words(tmp_path, monkeypatch, workers):
    """A reader whose messages name neither the file nor the cells (reworded), in this process or in a fill
    worker: the skip still finds the slide and records its level and cells, from the error's fields."""
    import patchgd.data.readers.base as base

    good = LazyImage(open_source(write_slide(tmp_path / "good.tif")))
    torn = LazyImage(open_source(truncate_tile(write_slide(tmp_path / "torn.tif"))))
    read = base.PatchSource.read

    def reworded(self, *args, **kwargs):
        try:
            return read(self, *args, **kwargs)
        except DataError as err:
            raise DataError("a tile would not decode", path=err.path, level=err.level, cells=err.cells) from None

    monkeypatch.setattr(base.PatchSource, "read", reworded)
    step = make_step()
    step.model.fill_workers = workers
    _, images, _, skipped = run_skipping(step.step, [good, torn], torch.tensor([0, 1]), step.model, step.optimizer,
                                         step.generator)
    assert images == [good] and [s.path for s in skipped] == [str(tmp_path / "torn.tif")]
    log = SkipLog(0.5)
    log.record(skipped, epoch=1, split="train")
    (row,) = log.rows
    assert row["level"] == 0 and row["cells"].startswith("grid row") and "a tile would not decode" in row["message"]


def test_drop_skipped_restacks_images_in_memory_and_errors_naming_no_image_propagate():
    images = [torch.zeros(3, 8, 8), Skipped("a.tif", "cannot decode"), torch.ones(3, 8, 8)]
    kept, labels, skipped = drop_skipped(images, torch.tensor([0, 1, 2]))
    assert isinstance(kept, torch.Tensor) and kept.shape == (2, 3, 8, 8) and labels.tolist() == [0, 2]
    assert skipped == [Skipped("a.tif", "cannot decode")]

    def fails(images, labels):
        raise DataError("some other file: cannot decode")

    lazy = [LazyImage(open_source_array())]
    with pytest.raises(DataError, match="some other file"):
        run_skipping(fails, lazy, torch.tensor([0]), torch.nn.Linear(1, 1))


def open_source_array():
    from patchgd.data.readers import ArraySource

    return ArraySource(np.zeros((3, 64, 64), np.uint8), path="fine.tif")


def test_build_time_exclusions_are_listed_and_count_against_the_threshold(tmp_path):
    write_cohort(tmp_path, good=3, broken_tile=0, not_a_slide=1)
    with pytest.raises(DataError, match="junk0.tif"):
        ImageCSVDataset(tmp_path / "train.csv", in_chans=3, patch_size=P)
    ds = ImageCSVDataset(tmp_path / "train.csv", in_chans=3, patch_size=P, on_error="skip")
    assert len(ds) == 3 and [s.path for s in ds.excluded] == [str(tmp_path / "train" / "junk0.tif")]
    logged = []
    skips = SkipLog(0.2, ds.excluded, log=logged.append)
    with pytest.raises(DataError, match=r"1 of 4 training images \(25.0%\) could not be opened, more than "
                                        "data.max_skipped=0.2; the first: .*junk0.tif: no image data"):
        skips.check_data(len(ds))
    SkipLog(0.25, ds.excluded, log=logged.append).check_data(len(ds))
    assert logged[0].startswith(f"skipped {tmp_path / 'train' / 'junk0.tif'}: ") and "leaves the data set" in logged[0]


def cohort_config(root, **data):
    return {"output_dir": str(root / "run"),
            "model": {"backbone": "test_resnet", "patch_size": P, "latent_dim": 8, "head_width": 8},
            "data": {"root": str(root), "num_classes": 2, "pad_value": 245, "tissue_fraction": 0.3, "level": 0,
                     "on_error": "skip", **data},
            "augment": {"flip": True, "rotate90": True, "hed": 0.05},
            "train": {"epochs": 2, "batch_size": 2, "device": "cpu"}, "patchgd": {"sampling": 0.25}}


@pytest.mark.parametrize("tissue", ["otsu", "none"])
def test_a_run_over_a_cohort_with_two_broken_slides_finishes_and_names_them(tmp_path, capsys, tissue):
    """With a tissue mask the torn tile is met when the loader reads the thumbnail (level 0 of a small
    slide); without one, in the step's fill."""
    write_cohort(tmp_path, good=7)  # 8 slides open (no batch is dropped), one of them torn; 2 of 9 broken
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cohort_config(tmp_path, tissue=tissue, max_skipped=0.25)))
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "skipped.csv").open()))
    by_file = {}
    for row in rows:
        by_file.setdefault(row["file"].rsplit("/", 1)[-1], []).append(row)
    assert set(by_file) == {"junk0.tif", "torn0.tif"}
    assert [(r["epoch"], r["split"]) for r in by_file["junk0.tif"]] == [("0", "train")]  # out of the data set
    assert [(r["epoch"], r["split"]) for r in by_file["torn0.tif"]] == [("1", "train"), ("2", "train")]
    assert all(r["level"] == "0" and "cannot decode" in r["message"] for r in by_file["torn0.tif"])
    if tissue == "none":
        assert all(r["cells"].startswith(("grid row 2, columns", "grid row 3, columns")) for r in by_file["torn0.tif"])
    else:  # met reading the tissue mask's thumbnail, at level 0 of this small slide
        assert all(r["cells"].endswith("(thumbnail)") for r in by_file["torn0.tif"])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "skipped " in log and "torn0.tif" in log and "leaves epoch 1 (train)" in log
    metrics = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(metrics) == 2 and all(np.isfinite(float(m["train_loss"])) for m in metrics)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["epoch"] == 2


def test_more_broken_slides_than_max_skipped_stop_the_run_with_the_list_written(tmp_path, capsys):
    write_cohort(tmp_path, good=6, broken_tile=2, not_a_slide=0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cohort_config(tmp_path, max_skipped=0.2)))
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "2 of 8 training images (25.0%) could not be read in epoch 1, more than data.max_skipped=0.2" in err
    assert "Traceback" not in err
    rows = list(csv.DictReader((tmp_path / "run" / "skipped.csv").open()))
    assert sorted(r["file"].rsplit("/", 1)[-1] for r in rows) == ["torn0.tif", "torn1.tif"]


def test_the_threshold_counts_training_images_and_its_stop_leaves_the_list(tmp_path, capsys):
    """One file of 6 training and 2 validation slides cannot be opened (tifffile warns about it): the share
    is 1 of 6 training images, the list is written before the stop, and stderr has one line naming it once."""
    write_cohort(tmp_path, good=5, broken_tile=0, not_a_slide=1)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cohort_config(tmp_path, max_skipped=0.05)))
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    junk = tmp_path / "train" / "junk0.tif"
    assert f"1 of 6 training images (16.7%) could not be opened, more than data.max_skipped=0.05; the first: {junk}: " \
        in err and "skipped.csv" in err
    lines = [line for line in err.splitlines() if "junk0" in line or "tifffile" in line]
    assert len(lines) == 1 and lines[0].count(str(junk)) == 1, lines  # tifffile's own warnings in that line
    rows = list(csv.DictReader((tmp_path / "run" / "skipped.csv").open()))
    assert [(r["epoch"], r["split"], r["file"]) for r in rows] == [("0", "train", str(junk))]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"skipped {junk}: no image data" in log  # the path once


def test_a_torn_tile_is_listed_with_its_level_and_cells(tmp_path):
    """The records of a skip carry the reader's level and cells as data, whether the thumbnail or a step met it."""
    path = truncate_tile(write_slide(tmp_path / "torn.tif"))
    with pytest.raises(DataError) as err:
        open_source(path).read_cells([(2, 4)], P)
    record = Skipped.of(path, err.value)
    assert (record.level, record.cells) == (0, "grid row 2, columns 4..4")
    with pytest.raises(DataError) as err:
        open_source(path).thumbnail(1024)
    assert (Skipped.of(path, err.value).level, Skipped.of(path, err.value).cells) == (0, "rows 0..256 (thumbnail)")


def test_stop_is_the_default_and_names_the_file(tmp_path, capsys):
    write_cohort(tmp_path, good=2, broken_tile=1, not_a_slide=0)
    cfg = cohort_config(tmp_path)
    del cfg["data"]["on_error"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    assert "torn0.tif" in capsys.readouterr().err


def _ddp_worker(rank, root):
    from patchgd.config import config_from_dict
    from patchgd.engine.trainer import fit

    fit(config_from_dict(cohort_config(root, tissue="none", max_skipped=0.25)), log=lambda line: None)


def test_two_processes_agree_on_the_skips_and_rank_zero_writes_them_all(tmp_path):
    from test_distributed import spawn

    write_cohort(tmp_path, good=7)
    spawn(_ddp_worker, tmp_path)
    rows = list(csv.DictReader((tmp_path / "run" / "skipped.csv").open()))
    torn = [(r["epoch"], r["split"]) for r in rows if r["file"].endswith("torn0.tif")]
    assert torn == [("1", "train"), ("2", "train")]  # on whichever process drew it, once per epoch
    assert [r["split"] for r in rows if r["file"].endswith("junk0.tif")] == ["train"]  # once, not per process
    assert len(list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))) == 2
