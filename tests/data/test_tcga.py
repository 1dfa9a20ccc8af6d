"""The TCGA preparer on a synthetic GDC sample sheet with tiny tifffile slides, and its recipe."""

import csv

import pytest

from patchgd.cli import PACKAGED_CONFIGS, main
from patchgd.config import load_config
from patchgd.engine.data import build_datasets

from slide_files import he_tile, write_pyramid_tiff

HEADER = "File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\tSample Type"


def gdc_download(root, rows):
    """``root/sheet.tsv`` and ``root/download/<File ID>/<File Name>`` as gdc-client leaves them."""
    lines = [HEADER]
    for i, (name, project, case, sample_type) in enumerate(rows):
        file_id = f"0000{i:04d}-aaaa-bbbb-cccc-dddddddddddd"
        lines.append(f"{file_id}\t{name}\tBiospecimen\tSlide Image\t{project}\t{case}\t{case}-01A\t{sample_type}")
        (root / "download" / file_id).mkdir(parents=True)
        write_pyramid_tiff(root / "download" / file_id / name, he_tile(), tile=128, levels=2, mpp=0.25)
    (root / "sheet.tsv").write_text("\n".join(lines) + "\n")
    return root / "sheet.tsv"


def slide(case, n, kind="DX"):
    return f"{case}-01Z-00-{kind}{n}.{case[-4:]}uuid.svs"


PATIENTS = [("TCGA-LUAD", f"TCGA-05-{1000 + i}") for i in range(4)] + \
           [("TCGA-LUSC", f"TCGA-18-{2000 + i}") for i in range(4)]


@pytest.fixture
def sheet(tmp_path):
    rows = []
    for p, (project, case) in enumerate(PATIENTS):
        rows += [(slide(case, n), project, case, "Primary Tumor") for n in range(1, 2 + p % 2)]
    rows += [(slide("TCGA-05-1000", 1, "TS"), "TCGA-LUAD", "TCGA-05-1000", "Primary Tumor"),  # frozen section
             (slide("TCGA-18-2000", 9), "TCGA-LUSC", "TCGA-18-2000", "Solid Tissue Normal"),
             (slide("TCGA-A1-3000", 1), "TCGA-BRCA", "TCGA-A1-3000", "Primary Tumor")]
    return gdc_download(tmp_path, rows)


def test_prepare_tcga_keeps_diagnostic_primary_slides_and_groups_folds_by_patient(tmp_path, sheet, capsys):
    out = tmp_path / "tcga"
    assert main(["prepare", "tcga", str(sheet), str(out), "--slides", str(tmp_path / "download"),
                 "--projects", "TCGA-LUAD", "TCGA-LUSC", "--folds", "2"]) == 0
    assert "12 slides of 8 patients (LUAD 6, LUSC 6)" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "train.csv").open()))
    assert {r["label"] for r in rows} == {"LUAD", "LUSC"}
    assert all("-DX" in r["image_id"] and "-09" not in r["image_id"] and "DX9" not in r["image_id"] for r in rows)
    folds_of = {}
    for r in rows:
        folds_of.setdefault(r["case_id"], set()).add(r["kfold"])
        assert (out / "slides" / r["image_id"]).is_file()
    assert all(len(f) == 1 for f in folds_of.values()) and len(folds_of) == 8
    for fold in ("0", "1"):
        assert {r["label"] for r in rows if r["kfold"] == fold} == {"LUAD", "LUSC"}

    cfg = load_config(PACKAGED_CONFIGS / "tcga_luad_lusc_patchgd.yaml",
                      [f"data.root={out}", "model.backbone=test_resnet", "model.pretrained=false"])
    train, val = build_datasets(cfg)
    assert len(train) + len(val) == 12 and not set(train.groups) & set(val.groups)
    assert train.classes == ["LUAD", "LUSC"]


def test_prepare_tcga_lists_missing_slides_and_exits_2(tmp_path, sheet, capsys):
    gone = next((tmp_path / "download").glob("*/TCGA-18-2001*DX1*"))
    gone.unlink()
    assert main(["prepare", "tcga", str(sheet), str(tmp_path / "out"), "--slides", str(tmp_path / "download"),
                 "--projects", "TCGA-LUAD", "TCGA-LUSC"]) == 2
    err = capsys.readouterr().err
    assert "1 of 12 slides" in err and gone.name in err
    assert not (tmp_path / "out").exists()
    # --allow-missing goes on without it, and says which it left out
    assert main(["prepare", "tcga", str(sheet), str(tmp_path / "out"), "--slides", str(tmp_path / "download"),
                 "--projects", "TCGA-LUAD", "TCGA-LUSC", "--folds", "4", "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "11 slides of 8 patients (LUAD 6, LUSC 5)" in out and "1 slide(s) of the sheet not downloaded" in out
    assert gone.name in out
    rows = list(csv.DictReader((tmp_path / "out" / "train.csv").open()))
    assert len(rows) == 11 and gone.name not in {r["image_id"] for r in rows}
    assert [r["file_name"] for r in csv.DictReader((tmp_path / "out" / "missing.csv").open())] == [gone.name]


def test_prepare_tcga_with_too_few_patients_for_the_folds_says_which_project_and_what_works(tmp_path, sheet,
                                                                                            capsys):
    # four patients a project, five folds asked: scikit-learn's words would name neither
    assert main(["prepare", "tcga", str(sheet), str(tmp_path / "out"), "--slides", str(tmp_path / "download"),
                 "--projects", "TCGA-LUAD", "TCGA-LUSC", "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "TCGA-LUAD has 4 patient(s)" in err and "too few for --folds 5" in err and "--folds 4 or fewer" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["prepare", "tcga", str(sheet), str(tmp_path / "out"), "--slides", str(tmp_path / "download"),
                 "--projects", "TCGA-LUAD", "TCGA-LUSC", "--folds", "4"]) == 0
