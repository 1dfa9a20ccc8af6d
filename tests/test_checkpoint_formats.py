"""Trained models survive releases: a checkpoint written by each earlier release keeps loading and predicting
the same (tests/fixtures/checkpoints: one fixture per format, made by make_checkpoint.py with that
release), older ones are migrated, and newer ones are refused with the way out."""

import json
import sys
from pathlib import Path

import pytest
import torch

import patchgd
from patchgd.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from patchgd.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
sys.path.insert(0, str(FIXTURES))
from make_checkpoint import fixture_images  # noqa: E402


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("format*.pt")))
def test_every_formats_fixture_loads_and_predicts_as_its_release_did(tmp_path, name):
    images = fixture_images(tmp_path)
    model, cfg = patchgd.load_model(FIXTURES / f"{name}.pt")
    expected = json.loads((FIXTURES / f"{name}.json").read_text())
    for path, predicted in zip(images, patchgd.predict(model, cfg, images)):
        assert predicted["probabilities"] == pytest.approx(expected[path.relative_to(tmp_path).as_posix()], abs=1e-5)


def test_the_fixtures_cover_every_format_up_to_this_releases():
    formats = {load_checkpoint(p).get("format", 1) for p in FIXTURES.glob("format*.pt")}
    assert formats == set(range(1, CHECKPOINT_FORMAT + 1)), "add a fixture: make_checkpoint.py formatN"


def test_unknown_config_keys_are_dropped_with_one_warning_and_newer_formats_refused(tmp_path, capsys):
    state = load_checkpoint(FIXTURES / f"format{CHECKPOINT_FORMAT}.pt")
    state["config"]["model"]["renamed_since"] = 3
    state["config"]["gone_section"] = {"key": 1}
    torch.save(state, tmp_path / "older.pt")
    images = fixture_images(tmp_path / "images")
    assert main(["predict", str(tmp_path / "older.pt"), str(images[0]), "--json"]) == 0
    captured = capsys.readouterr()
    assert "config key(s) model.renamed_since, gone_section of another patchgd release are not known here; ignored" \
        in captured.err
    state["format"] = CHECKPOINT_FORMAT + 1
    torch.save(state, tmp_path / "newer.pt")
    assert main(["predict", str(tmp_path / "newer.pt"), str(images[0])]) == 2
    assert f"checkpoint of format {CHECKPOINT_FORMAT + 1}, written by a newer patchgd" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="upgrade patchgd"):
        patchgd.load_model(tmp_path / "newer.pt")
