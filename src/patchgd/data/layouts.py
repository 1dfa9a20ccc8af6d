"""Where the images and labels of a data set are: CSV files (UltraMNIST's ``image_id,label``, PANDA's
``image_id,isup_grade[,kfold]``, labels as integers or class names, an ``mpp`` column), class folders,
folds, and finding each listed image on disk. The validation split of a data set is
:mod:`patchgd.data.splits`'."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from patchgd.data.errors import DataError
from patchgd.registry import suffixes

# Every file a data set accepts.
LABEL_COLUMNS = ("label", "isup_grade")  # auto-detected in this order
FOLD_COLUMN = "kfold"
MPP_COLUMN = "mpp"  # optional: each slide's microns per pixel at level 0, where its file's is missing or wrong


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: its image files}`` for the subfolders of ``folder`` that hold images."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    found, known = {}, suffixes()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in known and p.is_file())
        if files:
            found[sub.name] = files
    return found


def resolve_image_dir(csv_path: Path, image_dir: str | Path | None) -> Path:
    if image_dir is not None:
        folder = Path(image_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        return folder
    candidates = [csv_path.with_suffix(""), csv_path.parent / f"{csv_path.stem}_images"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no image folder for {csv_path}; expected {candidates[0]} or {candidates[1]}, or pass image_dir"
    )


def mpp_column(path: Path, rows: list[tuple[int, dict[str, str]]]) -> list[float | None]:
    """The ``mpp`` column's values: positive floats, or None for an empty cell."""
    values = []
    for line, row in rows:
        text = (row[MPP_COLUMN] or "").strip()
        try:
            value = float(text) if text else None
        except ValueError:
            value = -1.0
        if value is not None and not (math.isfinite(value) and value > 0):
            raise DataError(f"{path}, line {line}: {MPP_COLUMN}={text!r}; expected a positive number of microns per "
                            "pixel at level 0, or an empty cell")
        values.append(value)
    return values


def read_csv(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist")
    # utf-8-sig: spreadsheets often prepend a byte-order mark that would otherwise rename the first column.
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as err:
        utf16 = path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise DataError(f"{path}: not UTF-8 text ({'a UTF-16 file' if utf16 else f'byte {err.start}'}); "
                        "expected a UTF-8 CSV (save it as 'CSV UTF-8')") from None
    for line, row in rows:
        # DictReader files surplus fields under None and fills missing ones with None.
        if None in row or None in row.values():
            found = len(columns) + len(row.get(None, ())) - list(row.values()).count(None)
            raise DataError(f"{path}, line {line}: {found} fields; expected {len(columns)} (the header's "
                            f"{','.join(columns)})")
    if not columns:
        raise DataError(f"{path}: empty file; expected a header line such as image_id,label")
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows, columns


def check_unique(path: Path, rows: list[tuple[int, dict[str, str]]], id_column: str, label_column: str) -> None:
    """Each image listed once: a repeated row would weigh its image twice, two labels contradict."""
    first: dict[str, tuple[int, str]] = {}
    for line, row in rows:
        image_id, label = row[id_column], row[label_column]
        if image_id not in first:
            first[image_id] = (line, label)
            continue
        seen_line, seen_label = first[image_id]
        if seen_label != label:
            raise DataError(f"{path}, lines {seen_line} and {line}: image {image_id!r} has two labels "
                            f"({seen_label!r} and {label!r}); expected one row per image")
        raise DataError(f"{path}, lines {seen_line} and {line}: image {image_id!r} is listed twice; expected "
                        "one row per image")


def pick_label_column(path: Path, columns: list[str], label_column: str | None) -> str:
    if label_column is not None:
        require_column(path, columns, label_column, "label")
        return label_column
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    raise DataError(
        f"{path}: no label column; expected one of {list(LABEL_COLUMNS)}, found columns {columns}"
    )


def require_column(path: Path, columns: list[str], name: str, role: str) -> None:
    if name not in columns:
        raise DataError(f"{path}: no {role} column {name!r}; found columns {columns}")


def select_fold(
    path: Path, rows: list[tuple[int, dict[str, str]]], fold: int, split: str
) -> list[tuple[int, dict[str, str]]]:
    folds = [_parse_int(path, line, FOLD_COLUMN, row[FOLD_COLUMN]) for line, row in rows]
    if fold not in folds:
        raise DataError(
            f"{path}: fold={fold} not in the {FOLD_COLUMN} column; folds found: {sorted(set(folds))}"
        )
    keep_val = split == "val"
    return [r for r, k in zip(rows, folds) if (k == fold) == keep_val]


def encode_labels(path: Path, rows: list[tuple[int, str, str]], classes: Sequence[str] | None,
                   num_classes: int | None) -> tuple[list[int], list[str] | None]:
    """Class indices of ``(line, image id, label)`` rows, and the class names when there are any.

    Integer labels (every one) are indices, checked against ``num_classes``; with ``classes`` given they are
    indices into it (``[sparse, dense]`` names labels 0 and 1), unless every label is one of its names.
    Otherwise each label is a class name, looked up in ``classes`` (given, or the sorted names found).
    """
    names = [value.strip() for _, _, value in rows]
    integers = all(_is_integer(value) for _, _, value in rows)
    if integers and (classes is None or not set(names) <= set(classes)):
        count = num_classes if classes is None else len(classes)
        labels = [_parse_label(path, line, image_id, value, count) for line, image_id, value in rows]
        return labels, (list(classes) if classes is not None else None)
    classes = list(classes) if classes is not None else sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    for (line, image_id, _), name in zip(rows, names):
        if name not in index:
            raise DataError(f"{path}, line {line}: label {name!r} of image {image_id!r} is not a known class; "
                            f"expected one of {classes} (the training set's classes, or data.classes)")
    return [index[name] for name in names], classes


def _is_integer(value: str | None) -> bool:
    try:
        return float(value).is_integer()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _parse_label(path: Path, line: int, image_id: str, value: str, num_classes: int | None) -> int:
    label = _parse_int(path, line, f"label of {image_id!r}", value)
    if label < 0 or (num_classes is not None and label >= num_classes):
        expected = f"[0, {num_classes})" if num_classes is not None else "a non-negative integer"
        raise DataError(
            f"{path}, line {line}: label {label} of image {image_id!r} is out of range; expected {expected}"
        )
    return label


def _parse_int(path: Path, line: int, what: str, value: str | None) -> int:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():
        raise DataError(f"{path}, line {line}: {what} is {value!r}; expected an integer")
    return int(number)


def find_images(image_dir: Path, image_ids: list[str]) -> list[Path]:
    # One directory listing instead of a stat per row and extension: fast on large (network) folders.
    names = {entry.name for entry in os.scandir(image_dir)}
    by_stem: dict[tuple[str, str], str] = {}
    for name in sorted(names):
        stem, ext = os.path.splitext(name)
        if ext.lower() in suffixes():
            by_stem.setdefault((stem, ext.lower()), name)
    paths, missing = [], []
    for image_id in image_ids:
        name = _match(image_id, names, by_stem)
        if name is None:
            missing.append(image_id)
        else:
            paths.append(image_dir / name)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{len(missing)} image(s) missing from {image_dir}: {shown}; "
            f"expected files named by image_id with an extension among {' '.join(suffixes())}"
        )
    return paths


def _match(image_id: str, names: set[str], by_stem: dict[tuple[str, str], str]) -> str | None:
    if image_id in names and os.path.splitext(image_id)[1].lower() in suffixes():
        return image_id
    for ext in suffixes():
        if (image_id, ext) in by_stem:
            return by_stem[(image_id, ext)]
    return None


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    known = suffixes()
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in known and p.is_file())
