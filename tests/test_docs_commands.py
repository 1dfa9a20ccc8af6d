"""The README's and the docs' commands run as written, from a folder outside the repository (the recipes found
by name, as after ``pip install``), on tiny data made here: each page's ``bash`` block is run by bash."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from slide_files import he_tile, write_pyramid_tiff

ROOT = Path(__file__).resolve().parents[1]


def blocks(page: str, language: str) -> list[str]:
    """The fenced ``language`` blocks of a page, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", (ROOT / page).read_text(), flags=re.S | re.M)


def block_after(page: str, heading: str, language: str = "bash") -> str:
    """The first ``language`` block after ``heading`` on a page."""
    text = (ROOT / page).read_text()
    return re.search(rf"^```{language}\n(.*?)^```", text[text.index(heading):], flags=re.S | re.M).group(1)


def run(commands: str, cwd: Path) -> str:
    """``commands`` run by bash in ``cwd``, with this environment's ``patchgd`` and ``python`` first on the
    PATH (installed already: ``pip install`` lines are left out); their output, or a failure showing it."""
    commands = "\n".join(line for line in commands.splitlines() if not line.startswith("pip install"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, f"{commands}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_readme_trains_evaluates_and_predicts_own_images(tmp_path):
    """The README's "Train on your own images": its my.yaml, and its three commands on class folders."""
    rng = np.random.default_rng(0)
    for name, spots in (("plain", 0), ("spotted", 6)):
        (tmp_path / "my_images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(90, 110, (128, 128, 3), dtype=np.uint8)
            for y, x in rng.integers(0, 120, (spots, 2)):
                pixels[y:y + 8, x:x + 8] = 240
            Image.fromarray(pixels).save(tmp_path / "my_images" / name / f"{name}_{i:02d}.png")
    (tmp_path / "my.yaml").write_text(block_after("README.md", "## Train on your own images", "yaml"))
    out = run(block_after("README.md", "## Train on your own images", "bash"), tmp_path)
    assert "scored 3 images: the run's validation set" in out
    assert (tmp_path / "maps" / "spotted_03_heatmap.png").is_file()


def write_cohort(root: Path) -> None:
    """``root/{train,val}.csv`` and their ``.svs`` slides (tiled TIFFs, as OpenSlide's generic TIFF reads them)."""
    for split, count in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        rows = ["image_id,label"]
        for i in range(count):
            canvas = np.full((768, 768, 3), 242, np.uint8)
            tissue = np.tile(he_tile(), (2, 2, 1))[: 240 + 200 * (i % 2), :400]
            canvas[100:100 + len(tissue), 200:600] = tissue
            name = f"slide{i + (7 if split == 'val' else 1)}.svs"
            write_pyramid_tiff(root / split / name, canvas, tile=256, levels=2)
            rows.append(f"{name},{i % 2}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_the_readme_whole_slide_commands(tmp_path):
    write_cohort(tmp_path / "cohort")
    commands = block_after("README.md", "## Whole-slide images")
    assert "--set data.root=cohort" in commands  # the one edit the recipe needs, made on the command line
    run(commands.replace("patchgd train --config my-slides.yaml",
                         "patchgd train --config my-slides.yaml --set train.epochs=1 --set data.num_workers=0"),
        tmp_path)
    assert (tmp_path / "maps" / "slide7.geojson").is_file()


def test_the_slides_page_worked_example(tmp_path):
    """docs/slides.md's worked example: 12 synthetic slides, then inspect, stats, train, evaluate and predict
    with the packaged recipe; as written but for the slides' size (2,048 px instead of 8,192: 4 min 24 s as
    written on two cores, too long for the suite)."""
    commands = block_after("docs/slides.md", "A worked example")
    assert "size=8192" in commands
    out = run(commands.replace("size=8192", "size=2048"), tmp_path)
    assert "best val accuracy" in out and (tmp_path / "runs" / "slides" / "best.pt").is_file()


def test_the_heatmaps_page_zero_or_one_example(tmp_path, mnist_dir):
    """docs/heatmaps.md's "0" or "1" example: its config and its commands, with the real MNIST digits, 40 / 10
    images and 1 epoch instead of 480 / 100 and 6 (the measured run of the page)."""
    page = "docs/heatmaps.md"
    config = block_after(page, "For example, a model trained", "yaml")
    commands = block_after(page, "For example, a model trained")
    assert "epochs: 6" in config and "--train 480 --val 100" in commands
    (tmp_path / "zero-one.yaml").write_text(config.replace("epochs: 6", "epochs: 1"))
    run(commands.replace("--train 480 --val 100", "--train 40 --val 10").replace("MNIST_DIR", str(mnist_dir)),
        tmp_path)
    assert {p.name for p in (tmp_path / "maps").iterdir()} >= {"val_000000_heatmap.png", "val_000000_z.png"}
