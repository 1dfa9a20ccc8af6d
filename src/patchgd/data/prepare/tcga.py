"""Prepare TCGA diagnostic slides from a GDC download: labels by project, patient-grouped folds.

Input: the sample sheet the GDC portal exports beside its download manifest (a TSV with ``File ID``,
``File Name``, ``Project ID``, ``Case ID`` and ``Sample Type``, or, in newer sheets, ``Tissue Type`` and
``Tumor Descriptor``), and the folder ``gdc-client`` downloaded into (``SLIDES/<File ID>/<File Name>``, or
the slides side by side). Output ``OUT``: ``train.csv`` (``image_id,label,case_id,kfold``; the label is the
project without its ``TCGA-`` prefix) and ``slides/``, links to the slide files, which
:class:`patchgd.data.datasets.ImageCSVDataset` reads with ``data.group_column: case_id``. The folds are
stratified by label with every patient in one fold, since TCGA has several slides per patient and a split
by slide would put a patient on both sides.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from patchgd.data.splits import grouped_folds
from patchgd.data.errors import DataError
from patchgd.io import atomic_directory

REQUIRED = ("File ID", "File Name", "Project ID", "Case ID")
SLIDE_SUFFIX = ".svs"
PRIMARY_TUMOUR = "Primary Tumor"
MISSING_FILE = "missing.csv"  # the sheet's slides left out of a partial download (allow_missing)


def _is_diagnostic(file_name: str) -> bool:
    """A formalin-fixed diagnostic slide: its barcode's slide part is ``DX`` (frozen sections are TS/BS)."""
    return file_name.lower().endswith(SLIDE_SUFFIX) and "-DX" in file_name.upper()


def _sample_type(row: dict[str, str]) -> str:
    """The GDC sample type; newer sample sheets give tissue type and tumour descriptor instead."""
    if row.get("Sample Type"):
        return row["Sample Type"].split(",")[0].strip()
    if row.get("Tissue Type", "").strip() == "Tumor" and row.get("Tumor Descriptor", "").strip() == "Primary":
        return PRIMARY_TUMOUR
    return " ".join(filter(None, (row.get("Tumor Descriptor", "").strip(), row.get("Tissue Type", "").strip())))


def read_sample_sheet(path: str | Path, *, projects: list[str] | None = None,
                      sample_types: list[str] | None = (PRIMARY_TUMOUR,)) -> list[dict[str, str]]:
    """The diagnostic slides of a GDC sample sheet: ``file_id``, ``file_name``, ``project``, ``case_id``.

    Args:
        path: The sample sheet (TSV).
        projects: Projects to keep (e.g. ``["TCGA-LUAD", "TCGA-LUSC"]``); None keeps every project found.
        sample_types: Sample types to keep (default primary tumours); None keeps all.

    Raises:
        FileNotFoundError: No such sheet.
        DataError: A column is missing, or fewer than two projects remain.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; expected a GDC sample sheet (TSV) with "
                            f"{', '.join(REQUIRED)} and Sample Type; found {reader.fieldnames}")
        rows = list(reader)
    slides = []
    for row in rows:
        project = row["Project ID"].strip()
        if not _is_diagnostic(row["File Name"]) or (projects and project not in projects):
            continue
        if sample_types and _sample_type(row) not in sample_types:
            continue
        slides.append({"file_id": row["File ID"].strip(), "file_name": row["File Name"].strip(),
                       "project": project, "case_id": row["Case ID"].split(",")[0].strip()})
    found = sorted({s["project"] for s in slides})
    if len(found) < 2:
        raise DataError(f"{path}: {len(slides)} diagnostic {'/'.join(sample_types or ['any'])} slide(s) of "
                        f"project(s) {found} (of {len(rows)} rows); expected slides of at least two projects"
                        + (f" among {projects}" if projects else ""))
    return slides


def _locate(slides_dir: Path, slide: dict[str, str]) -> Path | None:
    for candidate in (slides_dir / slide["file_id"] / slide["file_name"], slides_dir / slide["file_name"]):
        if candidate.is_file():
            return candidate.resolve()
    return None


def prepare_tcga(sample_sheet: str | Path, slides_dir: str | Path, out: str | Path, *,
                 projects: list[str] | None = None, sample_types: list[str] | None = (PRIMARY_TUMOUR,),
                 folds: int = 5, seed: int = 42, overwrite: bool = False, allow_missing: bool = False) -> Path:
    """Write ``out/train.csv`` (patient-grouped, stratified ``kfold``) and ``out/slides/`` links, atomically.

    Args:
        sample_sheet: The GDC sample sheet.
        slides_dir: Where the slides were downloaded (``<File ID>/<File Name>`` or flat).
        out: The folder to create.
        projects: Projects to keep (and label by); None: all in the sheet.
        sample_types: Sample types to keep (default primary tumours); None: all.
        folds: Folds of the ``kfold`` column (``StratifiedGroupKFold`` by project, grouped by case).
        seed: Fold shuffling seed.
        overwrite: Replace an existing non-empty ``out``.
        allow_missing: Leave out the slides of the sheet that are not in ``slides_dir`` (a partial download)
            and list them in ``out/missing.csv``, instead of stopping.

    Raises:
        FileNotFoundError: Listing the slides of the sheet that are not in ``slides_dir`` (without
            ``allow_missing``).
        DataError: See :func:`read_sample_sheet`; too few patients for the folds.
    """
    slides_dir = Path(slides_dir)
    if not slides_dir.is_dir():
        raise FileNotFoundError(f"slide folder {slides_dir} does not exist; expected the folder gdc-client "
                                "downloaded the sample sheet's files into")
    slides = read_sample_sheet(sample_sheet, projects=projects, sample_types=sample_types)
    located = [_locate(slides_dir, s) for s in slides]
    missing = [s for s, p in zip(slides, located) if p is None]
    if missing and not allow_missing:
        shown = ", ".join(s["file_name"] for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(slides)} slides of {sample_sheet} are not in {slides_dir} "
                                f"(as <File ID>/<File Name> or <File Name>): {shown}; download them with "
                                "gdc-client and the portal's manifest, or go on without them (--allow-missing)")
    slides, located = [s for s, p in zip(slides, located) if p is not None], [p for p in located if p is not None]
    if not slides:
        raise FileNotFoundError(f"none of the slides of {sample_sheet} is in {slides_dir}")
    labels = sorted({s["project"] for s in slides})
    index = {name: i for i, name in enumerate(labels)}
    patients = {name: len({s["case_id"] for s in slides if s["project"] == name}) for name in labels}
    fewest = min(labels, key=patients.get)
    if patients[fewest] < folds:  # some fold would validate without this class
        way_out = (f"pass --folds {patients[fewest]} or fewer" if patients[fewest] >= 2 else
                   f"add patients of {fewest} or leave the project out (--projects)")
        raise DataError(f"{sample_sheet}: {fewest} has {patients[fewest]} patient(s) (each stays in one fold), too few "
                        f"for --folds {folds}, which needs at least {folds} patients in every project; {way_out}")
    fold_of = grouped_folds([index[s["project"]] for s in slides], [s["case_id"] for s in slides], folds, seed,
                            sample_sheet)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "slides").mkdir()
        with (tmp / "train.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_id", "label", "case_id", "kfold"])
            for slide, path, fold in zip(slides, located, fold_of):
                (tmp / "slides" / slide["file_name"]).symlink_to(path)
                writer.writerow([slide["file_name"], slide["project"].removeprefix("TCGA-"), slide["case_id"], fold])
        if missing:
            with (tmp / MISSING_FILE).open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(missing[0]), lineterminator="\n")
                writer.writeheader()
                writer.writerows(missing)
    return Path(out)


def describe(out: Path) -> str:
    """One line on a prepared folder: slides, patients and slides per class, and the slides left out."""
    with (out / "train.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    per_class = Counter(r["label"] for r in rows)
    line = (f"{len(rows)} slides of {len({r['case_id'] for r in rows})} patients ("
            + ", ".join(f"{name} {n}" for name, n in sorted(per_class.items())) + ")")
    if (out / MISSING_FILE).is_file():
        with (out / MISSING_FILE).open(newline="") as f:
            names = [r["file_name"] for r in csv.DictReader(f)]
        line += (f"; {len(names)} slide(s) of the sheet not downloaded were left out ({out / MISSING_FILE}): "
                 + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
    return line
