"""Heads, methods and readers of one's own: one module and one registration each, trained from a config;
the command line finds them through the ``patchgd.plugins`` entry points of an installed package."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch.nn as nn
from PIL import Image

import patchgd
from patchgd.config import ConfigError, config_from_dict
from patchgd.data.readers import ImageFileSource, PatchSource, TiffSource, choose_reader, open_source
from patchgd.engine.trainer import fit
from patchgd.inference import load_model
from patchgd.methods import PatchGD
from patchgd.registry import HEADS, METHODS, READERS, suffixes

from helpers import spotted_images


# --- what a user writes, outside the package --------------------------------------------------------------

@patchgd.register_head("test-linear", bag=True)
class LinearHead(nn.Module):
    """The codes' mean, scaled, then one linear layer. Of the common keys it names only ``dropout``
    (``model.head_dropout``); ``scale`` is its own (``model.head_args``)."""

    def __init__(self, latent_dim, num_classes, dropout, scale=1.0):
        super().__init__()
        self.scale, self.dropout = scale, dropout
        self.fc = nn.Linear(latent_dim, num_classes)

    def forward(self, z, mask=None):
        return self.fc(self.scale * z.flatten(2).mean(dim=2))


def _every_cell_step(cfg, model, optimizer, **run):
    """PatchGD with every cell sampled in one inner iteration, whatever patchgd.sampling says."""
    return PatchGD(model, optimizer, sampling=1.0, amp=cfg.train.amp, **run)


patchgd.register_method("test-every-cell", patches=True)(patchgd.Method(patchgd.PatchGDClassifier, _every_cell_step))


@patchgd.register_reader("test-npy", suffixes=(".npy",))
class NpySource(PatchSource):
    """A ``(H, W)`` or ``(H, W, C)`` NumPy file, memory-mapped: read in pieces like a slide."""

    def __init__(self, path, *, in_chans=3, level=None, mpp=None, slide_mpp=None):
        super().__init__(str(path), in_chans, slide_mpp)
        self._array = None
        self.tiled = True
        self._ensure_open()
        self.dtype = self._array.dtype
        self._choose_level(level, mpp)

    @property
    def _levels(self):
        self._ensure_open()
        return [(self._array.shape[0], self._array.shape[1], 1.0)]

    def _open(self):
        self._array = np.load(self.path, mmap_mode="r")

    def _close(self):
        self._array = None

    def _region(self, level, y, x, h, w):
        region = np.asarray(self._array[y:y + h, x:x + w])
        return region[..., None] if region.ndim == 2 else region


# --- data ---------------------------------------------------------------------------------------------------

def config(tmp_path, root, **sections):
    raw = {"output_dir": str(tmp_path / "run"),
           "model": {"backbone": "test_resnet", "patch_size": 32, "latent_dim": 8, "in_chans": 1, "head_width": 8},
           "data": {"root": str(root), "tissue": "none"},
           "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "warmup_epochs": 0.5, "heatmap_every": 0},
           "patchgd": {"sampling": 0.5}}
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section] = {**raw.get(section, {}), **values}
        else:
            raw[section] = values
    return config_from_dict(raw)


# --- the tests ------------------------------------------------------------------------------------------------

def test_a_head_registered_outside_the_package_trains_from_a_config_with_its_own_arguments(tmp_path):
    root = spotted_images(tmp_path / "data")
    cfg = config(tmp_path, root, model={"head": "test-linear", "head_args": {"scale": 2.0}})
    summary = fit(cfg, log=lambda line: None)
    assert summary["epochs"] == 1
    model, _ = load_model(tmp_path / "run" / "best.pt")
    assert isinstance(model.head, LinearHead) and model.head.scale == 2.0
    assert model.head.dropout == cfg.model.head_dropout  # a common key it names; width it does not take
    # a sub-bag needs a head that takes a set of cells; this one says it does
    assert config_from_dict({"method": "subbag", "model": {"head": "test-linear"}}).model.head == "test-linear"
    with pytest.raises(ConfigError, match="method=subbag and model.head='conv'.*test-linear"):
        config_from_dict({"method": "subbag", "model": {"head": "conv"}})


def test_head_args_the_head_does_not_take_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model.head='test-linear' with model.head_args=\{'shift': 1\}: .*'shift'"):
        patchgd.PatchGDClassifier("test_resnet", 2, 32, 8, "test-linear", head_args={"shift": 1})
    with pytest.raises(ValueError, match=r"model.head='attention' with model.head_args=\{'depth': 3\}"):
        patchgd.PatchGDClassifier("test_resnet", 2, 32, 8, "attention", head_args={"depth": 3})


def test_a_method_registered_outside_the_package_trains_from_a_config(tmp_path):
    root = spotted_images(tmp_path / "data")
    encoded = {}
    for method in ("patchgd", "test-every-cell"):
        cfg = config(tmp_path / method, root, method=method, patchgd={"sampling": 0.5, "max_sampled": 0.5})
        fit(cfg, log=lambda line: None)
        (row,) = list(csv.DictReader((tmp_path / method / "run" / "metrics.csv").open()))
        encoded[method] = int(row["encoded_with_grad"])
    model, loaded = load_model(tmp_path / "test-every-cell" / "run" / "best.pt")
    assert loaded.method == "test-every-cell" and isinstance(model, patchgd.PatchGDClassifier)
    # its step re-encodes all 4 cells of each training image, PatchGD's half of them (max_sampled 0.5)
    train = int(encoded["patchgd"] / 2)
    assert encoded == {"patchgd": 2 * train, "test-every-cell": 4 * train} and train > 0


def test_a_reader_registered_outside_the_package_reads_its_suffix_in_pieces(tmp_path):
    root = spotted_images(tmp_path / "data", suffix=".npy")
    assert ".npy" in suffixes() and choose_reader(next(root.rglob("*.npy"))) is NpySource
    cfg = config(tmp_path, root)
    fit(cfg, log=lambda line: None)
    model, loaded = load_model(tmp_path / "run" / "best.pt")
    image = next((root / "spotted").glob("*.npy"))
    (result,) = patchgd.predict(model, loaded, [image])
    assert result["image"] == str(image) and result["class_name"] in ("plain", "spotted")


def test_the_reader_is_chosen_by_suffix_and_contents_or_by_data_reader(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (64, 96), dtype=np.uint8)
    tiled, strip, png = tmp_path / "tiled.tif", tmp_path / "strip.tif", tmp_path / "a.png"
    tifffile.imwrite(tiled, pixels, tile=(32, 32))
    tifffile.imwrite(strip, pixels)
    Image.fromarray(pixels).save(png)
    assert choose_reader(tiled) is TiffSource and choose_reader(strip) is ImageFileSource
    assert choose_reader(png) is ImageFileSource
    # data.reader forces one: the tiled TIFF decoded whole by the image reader, the same pixels
    whole = open_source(tiled, in_chans=1, reader="image")
    pieces = open_source(tiled, in_chans=1)
    assert isinstance(whole, ImageFileSource) and isinstance(pieces, TiffSource)
    np.testing.assert_array_equal(whole.read(0, 0, 64, 96), pieces.read(0, 0, 64, 96))
    with pytest.raises(ConfigError, match="data.reader='tif': no such reader.*did you mean 'tiff'"):
        config_from_dict({"data": {"reader": "tif"}})


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="head 'conv' is registered already"):
        patchgd.register_head("conv")(LinearHead)
    assert HEADS.names()[:5] == ["conv", "conv1d", "transformer", "attention", "mean"]
    assert METHODS.info("subbag") == {"patches": True, "bag": True} and "openslide" in READERS.names()


PLUGIN = '''
import torch.nn as nn
import patchgd

@patchgd.register_head("plugin-pool")
def pool_head(latent_dim, num_classes, width):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(latent_dim, width), nn.ReLU(),
                         nn.Linear(width, num_classes))
'''


def test_the_command_line_finds_a_head_through_an_installed_packages_entry_point(tmp_path):
    # An installed package, as pip would leave it: its module and its dist-info with the entry point.
    site = tmp_path / "site"
    (site / "patchgd_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "patchgd_plugin_demo.py").write_text(textwrap.dedent(PLUGIN))
    (site / "patchgd_plugin_demo-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: patchgd-plugin-demo\nVersion: 0.1\n")
    (site / "patchgd_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text(
        "[patchgd.plugins]\ndemo = patchgd_plugin_demo\n")
    root = spotted_images(tmp_path / "data")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{backbone: test_resnet, patch_size: 32, "
                         f"latent_dim: 8, in_chans: 1, head: plugin-pool, head_width: 8}}\n"
                         f"data: {{root: {root}, tissue: none}}\ntrain: {{epochs: 1, batch_size: 4, device: cpu, "
                         f"heatmap_every: 0}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "patchgd", "train", "--config", str(yaml_file)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "patchgd", "predict", str(tmp_path / "run" / "best.pt"),
                           str(next((root / "spotted").glob("*.png")))], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "spotted" in done.stdout + done.stderr, done.stderr
    # without the package, the name is unknown: one clear line
    done = subprocess.run([sys.executable, "-m", "patchgd", "train", "--config", str(yaml_file)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert done.returncode == 2 and "model.head='plugin-pool': no such head" in done.stderr
