"""``patchgd generate``, ``prepare``, ``stats`` and ``inspect``: data sets made, prepared, measured and looked at."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ConfigError
from .common import add_config_options, config_from_args


def cmd_generate(args) -> int:
    from ..data.prepare.digits import load_digits_source
    from ..data.prepare.ultramnist import generate_ultramnist, preset_options

    source = load_digits_source(args.digits)
    print(f"digits: {source.description}")
    options = preset_options(args.preset) if args.preset else {}
    for key in ("image_size", "num_classes", "min_digits", "max_digits", "max_scale"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    out = generate_ultramnist(args.out, train=args.train, val=args.val, digits=source, seed=args.seed,
                              overwrite=args.overwrite, **options)
    print(f"wrote {out} (train.csv, val.csv, train/, val/, meta.json)")
    return 0


def cmd_generate_megapixel(args) -> int:
    from ..data.prepare.digits import load_digits_source
    from ..data.prepare.megapixel_mnist import PRESETS, generate_megapixel_mnist

    source = load_digits_source(args.digits)
    print(f"digits: {source.description}")
    options = dict(PRESETS[args.preset])
    for key in ("train", "val", "image_size", "noise"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    out = generate_megapixel_mnist(args.out, digits=source, seed=args.seed, overwrite=args.overwrite, **options)
    print(f"wrote {out} (train.csv, val.csv, train/, val/, meta.json): {options['train']} / {options['val']} images "
          f"of {options['image_size']} px, {options['noise']} scribbles each")
    return 0


def cmd_prepare(args) -> int:
    from ..data.prepare.panda import prepare_panda

    out = prepare_panda(args.src, args.out, size=args.size, folds=args.folds, seed=args.seed,
                        workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {out} (train.csv with kfold column, train_images/)")
    return 0


def cmd_prepare_aeon(args) -> int:
    from ..data.prepare.aeon import prepare_aeon

    out = prepare_aeon(args.name, args.out, overwrite=args.overwrite)
    meta = json.loads((out / "meta.json").read_text())
    print(f"wrote {out} (train.npz, val.npz, meta.json): {meta['train']} train / {meta['val']} val sequences of "
          f"{meta['channels']} channels x {meta['length']} steps, {len(meta['classes'])} classes "
          f"({', '.join(meta['classes'])})")
    return 0


def cmd_prepare_tcga(args) -> int:
    from ..data.prepare.tcga import describe, prepare_tcga

    sheet = Path(args.sample_sheet)
    out = prepare_tcga(sheet, args.slides or sheet.parent, args.out, projects=args.projects,
                       sample_types=None if args.all_sample_types else args.sample_types, folds=args.folds,
                       seed=args.seed, overwrite=args.overwrite, allow_missing=args.allow_missing)
    print(f"wrote {out} (train.csv with case_id and kfold columns, slides/): {describe(out)}")
    return 0


def cmd_extract(args) -> int:
    from .. import distributed
    from ..extract import extract_features

    cfg = config_from_args(args)
    with distributed.process_group(cfg.train.device):
        extract_features(cfg, args.out, device=args.device, log=lambda line: print(line, flush=True))
    return 0


def cmd_stats(args) -> int:
    from ..data.datasets import compute_normalization
    from ..engine.data import build_datasets, read_options

    if args.folder is None and args.config is None:
        raise ConfigError("patchgd stats needs a FOLDER of images, --config FILE.yaml (its training images), "
                          "or both")
    if args.config is None:
        source, in_chans, intensity = args.folder, args.in_chans, None
    else:
        cfg = config_from_args(args)
        read = read_options(cfg)
        source = args.folder if args.folder is not None else build_datasets(cfg)[0]
        in_chans, intensity = read["in_chans"], read["intensity"]
    mean, std = compute_normalization(source, in_chans, intensity=intensity, max_images=args.max_images,
                                      progress=True)
    print(json.dumps({"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}))
    print("put these under data.mean and data.std in your config", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from ..data.readers import open_source
    from ..data.tissue import tissue_cells
    from ..plots import plot_slide_grid

    source = open_source(args.slide, level=args.level, mpp=args.mpp, slide_mpp=args.slide_mpp)
    info = source.describe()
    mpp, origin = info["mpp"], info["mpp_origin"]
    if mpp is None:
        said = (f"mpp unknown: {origin}; give the scan's with an mpp column in the CSV, data.slide_mpp (or "
                "--slide-mpp here)")
    else:
        said = f"{mpp:.4g} um/px at level 0{' (given)' if origin == 'given' else ''}"
    print(f"{info['path']}: {info['vendor'] or 'image'}, {said}")
    print("level  height x width  downsample  um/px")
    for k, lv in enumerate(info["levels"]):
        chosen = "  <- chosen" if k == info["level"] else ""
        lv_mpp = f"{lv['mpp']:.4g}" if lv["mpp"] else "-"
        print(f"{k:5d}  {lv['height']:>6} x {lv['width']:<6}  {lv['downsample']:10.4g}  {lv_mpp:>5}{chosen}")
    p = args.patch_size
    rows, cols = -(-source.height // p), -(-source.width // p)
    # The mask training uses (data.tissue.tissue_mask), from the thumbnail that is also drawn.
    thumbnail = source.thumbnail(args.thumbnail_side)
    mask = tissue_cells(thumbnail, source.height, source.width, p, args.tissue_fraction)
    print(f"grid: {rows} x {cols} cells of {p} px at level {info['level']} ({rows * cols} cells)")
    print(f"tissue: {int(mask.sum())} cells ({mask.mean():.1%}) with tissue fraction >= {args.tissue_fraction}")
    if args.out:
        title = (f"{Path(args.slide).name}  level {info['level']}  {rows}x{cols} cells of {p} px  "
                 f"{int(mask.sum())} tissue cells (green border)")
        plot_slide_grid(thumbnail, mask, source.height, source.width, p, args.out, title=title)
        print(f"wrote {args.out} ({thumbnail.shape[1]} x {thumbnail.shape[0]} px)")
    return 0


def _writes(parser: argparse.ArgumentParser, func, out_help: str) -> None:
    """The output folder a generator or preparer writes atomically, ``--overwrite``, and its command."""
    parser.add_argument("out", help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=func)


def register(sub) -> None:
    """Add ``generate``, ``prepare``, ``extract``, ``stats`` and ``inspect`` to the ``patchgd`` command's subparsers
    ``sub``."""
    gen = sub.add_parser("generate", help="generate a synthetic data set")
    gen_sub = gen.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    um = gen_sub.add_parser("ultramnist", help="UltraMNIST: 3-5 digits per image, label = their sum")
    _writes(um, cmd_generate, "output folder (written atomically)")
    um.add_argument("--train", type=int, required=True, help="number of training images")
    um.add_argument("--val", type=int, required=True, help="number of validation images")
    um.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 512)")
    um.add_argument("--num-classes", type=int, default=None,
                    help="labels are the digit sums 0..N-1 (default 10; 2 with one digit: a '0' or a '1')")
    um.add_argument("--min-digits", type=int, default=None, help="fewest digits per image (default 3)")
    um.add_argument("--max-digits", type=int, default=None, help="most digits per image (default 5)")
    um.add_argument("--max-scale", type=int, default=None,
                    help="largest digit scale (x 28 px; default: by image size, as the paper's generator)")
    um.add_argument("--digits", default=None,
                    help="MNIST folder in IDX format (default: scikit-learn's bundled digits)")
    um.add_argument("--preset", choices=["default", "original"], default=None,
                    help="'original' = the 4000 px, 28-class benchmark")
    um.add_argument("--seed", type=int, default=0)
    mp = gen_sub.add_parser("megapixel-mnist", help="Megapixel MNIST: 5 digits on a large canvas, 3 of the class")
    _writes(mp, cmd_generate_megapixel, "output folder (written atomically)")
    mp.add_argument("--preset", choices=["original", "scaled", "demo"], default="scaled",
                    help="'original' = Katharopoulos & Fleuret's 1500 px, 5000 / 1000 images; 'scaled' (default) = "
                         "500 px, 1000 / 200 images, the same digit size and scribble density; 'demo' = "
                         "patchgd demo's 256 px, 900 / 200 images")
    mp.add_argument("--train", type=int, default=None, help="number of training images (default: the preset's)")
    mp.add_argument("--val", type=int, default=None, help="number of validation images (default: the preset's)")
    mp.add_argument("--image-size", type=int, default=None, help="canvas side in pixels (default: the preset's)")
    mp.add_argument("--noise", type=int, default=None, help="scribbles per image (default: the preset's)")
    mp.add_argument("--digits", default=None,
                    help="MNIST folder in IDX format (default: scikit-learn's bundled digits)")
    mp.add_argument("--seed", type=int, default=0)

    prep = sub.add_parser("prepare", help="prepare a real data set for training")
    prep_sub = prep.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    panda = prep_sub.add_parser("panda", help="PANDA: resize slides to N px squares, stratified folds")
    panda.add_argument("src", help="PANDA folder with train.csv and train_images/")
    _writes(panda, cmd_prepare, "output folder (written atomically)")
    panda.add_argument("--size", type=int, required=True, help="side N of the square images (512/2048/4096)")
    panda.add_argument("--folds", type=int, default=5, help="number of stratified folds")
    panda.add_argument("--seed", type=int, default=42)
    panda.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    aeon = prep_sub.add_parser("aeon", help="a time-series data set bundled with the aeon package, for 1-D PatchGD "
                               "(data.kind: sequences)")
    aeon.add_argument("name", help="data set name, e.g. BasicMotions (multichannel: BasicMotions)")
    _writes(aeon, cmd_prepare_aeon, "output folder (written atomically): train.npz, val.npz, meta.json")
    tcga = prep_sub.add_parser("tcga", help="TCGA diagnostic slides from a GDC sample sheet: labels by project, "
                               "folds grouped by patient")
    tcga.add_argument("sample_sheet", help="the GDC portal's sample sheet (TSV) of the downloaded slides")
    _writes(tcga, cmd_prepare_tcga, "output folder (written atomically): train.csv and slides/ (links)")
    tcga.add_argument("--slides", help="folder gdc-client downloaded into (<File ID>/<File Name>; default: the "
                      "sample sheet's folder)")
    tcga.add_argument("--projects", nargs="+", help="projects to keep and label by, e.g. TCGA-LUAD TCGA-LUSC "
                      "(default: every project in the sheet)")
    tcga.add_argument("--sample-types", nargs="+", default=["Primary Tumor"],
                      help="GDC sample types to keep (default: Primary Tumor)")
    tcga.add_argument("--all-sample-types", action="store_true", help="keep every sample type")
    tcga.add_argument("--folds", type=int, default=5, help="folds of the kfold column (default 5)")
    tcga.add_argument("--seed", type=int, default=42)
    tcga.add_argument("--allow-missing", action="store_true",
                      help="go on without the sheet's slides that are not downloaded (a partial download), listing "
                           "them in OUT/missing.csv")

    extract = sub.add_parser("extract", help="encode a config's images once with its encoder: one NAME.h5 per "
                             "slide in TRIDENT's layout (features, coords), resumable, broken slides listed")
    add_config_options(extract)
    extract.add_argument("--out", required=True, help="folder of the .h5 files (patchgd.features_from reads it)")
    extract.add_argument("--device", default="auto")
    extract.set_defaults(func=cmd_extract)

    stats = sub.add_parser("stats", help="per-channel mean and std of a data set, for data.mean/data.std")
    stats.add_argument("folder", nargs="?", help="folder of images (its subfolders too); default: the training "
                       "images of --config")
    add_config_options(stats, required=False)
    stats.add_argument("--in-chans", type=int, default=None, choices=(1, 3),
                       help="without --config: 1 (grayscale) or 3 (RGB); default: as the images are")
    stats.add_argument("--max-images", type=int, default=None, help="use a random subset of this size")
    stats.set_defaults(func=cmd_stats)

    insp = sub.add_parser("inspect", help="levels, mpp and tissue grid of a slide or image; draws a thumbnail")
    insp.add_argument("slide", help="a whole-slide file (svs, ndpi, mrxs, tiled tiff, ...) or an image")
    insp.add_argument("--out", default=None, help="write a PNG thumbnail with the tissue cells and the grid")
    insp.add_argument("--patch-size", type=int, default=256, help="grid patch side in pixels (default 256)")
    res = insp.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, default=None, help="pyramid level (0 = full resolution, default)")
    res.add_argument("--mpp", type=float, default=None, help="target microns per pixel instead of --level")
    insp.add_argument("--slide-mpp", type=float, default=None,
                      help="the scan's microns per pixel at level 0, instead of the file's metadata")
    insp.add_argument("--tissue-fraction", type=float, default=0.1,
                      help="smallest tissue fraction of a tissue cell (default 0.1, as data.tissue_fraction)")
    insp.add_argument("--thumbnail-side", type=int, default=2048,
                      help="long side of the thumbnail the tissue mask is computed on (default 2048)")
    insp.set_defaults(func=cmd_inspect)
