"""The ``patchgd`` command: generate, prepare, train, evaluate, predict, inspect, plan, sweep, stats, demo
and bench.

Only the standard library, PyYAML and the config schema are imported here; every command imports what
it needs (torch among it) when it runs, so that ``patchgd --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .bench import parse_with_benchmarks
from .config import Config, ConfigError, check_paths, load_config

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def _config_from_args(args) -> Config:
    return load_config(args.config, args.set)


def cmd_generate(args) -> int:
    from .data.digits import load_digits_source
    from .data.ultramnist import generate_ultramnist, preset_options

    source = load_digits_source(args.digits)
    print(f"digits: {source.description}")
    options = preset_options(args.preset) if args.preset else {}
    if args.image_size is not None:
        options["image_size"] = args.image_size
    out = generate_ultramnist(args.out, train=args.train, val=args.val, digits=source, seed=args.seed,
                              overwrite=args.overwrite, **options)
    print(f"wrote {out} (train.csv, val.csv, train/, val/, meta.json)")
    return 0


def cmd_generate_megapixel(args) -> int:
    from .data.digits import load_digits_source
    from .data.megapixel_mnist import PRESETS, generate_megapixel_mnist

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


def cmd_prepare_aeon(args) -> int:
    from .data.sequences import prepare_aeon

    out = prepare_aeon(args.name, args.out, overwrite=args.overwrite)
    meta = json.loads((out / "meta.json").read_text())
    print(f"wrote {out} (train.npz, val.npz, meta.json): {meta['train']} train / {meta['val']} val sequences of "
          f"{meta['channels']} channels x {meta['length']} steps, {len(meta['classes'])} classes "
          f"({', '.join(meta['classes'])})")
    return 0


def cmd_prepare(args) -> int:
    from .data.panda import prepare_panda

    out = prepare_panda(args.src, args.out, size=args.size, folds=args.folds, seed=args.seed,
                        workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {out} (train.csv with kfold column, train_images/)")
    return 0


def cmd_prepare_tcga(args) -> int:
    from .data.tcga import describe, prepare_tcga

    sheet = Path(args.sample_sheet)
    out = prepare_tcga(sheet, args.slides or sheet.parent, args.out, projects=args.projects,
                       sample_types=None if args.all_sample_types else args.sample_types, folds=args.folds,
                       seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {out} (train.csv with case_id and kfold columns, slides/): {describe(out)}")
    return 0


def cmd_stats(args) -> int:
    from .data.datasets import compute_normalization
    from .engine.data import build_datasets, read_options

    if args.folder is None and args.config is None:
        raise ConfigError("patchgd stats needs a FOLDER of images, --config FILE.yaml (its training images), "
                          "or both")
    if args.config is None:
        source, in_chans, intensity = args.folder, args.in_chans, None
    else:
        cfg = _config_from_args(args)
        read = read_options(cfg)
        source = args.folder if args.folder is not None else build_datasets(cfg)[0]
        in_chans, intensity = read["in_chans"], read["intensity"]
    mean, std = compute_normalization(source, in_chans, intensity=intensity, max_images=args.max_images,
                                      progress=True)
    print(json.dumps({"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}))
    print("put these under data.mean and data.std in your config", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    if args.resume:
        # The resumed run's config: --config, or the run's own config.yaml, with --set on top; fit()
        # refuses it if it differs from the checkpoint's in anything but a larger train.epochs.
        saved = Path(args.resume) / "config.yaml"
        if args.config is None and not saved.is_file():
            raise FileNotFoundError(f"{saved} not found: --resume expects a run directory made by patchgd train")
        cfg = load_config(args.config or saved, args.set)
    else:
        if args.config is None:
            raise ConfigError("patchgd train needs --config FILE.yaml (or --resume RUN_DIR)")
        cfg = _config_from_args(args)
        check_paths(cfg)  # torch and timm take seconds to load: a wrong path is reported before them
    from . import distributed
    from .engine.trainer import fit

    with distributed.process_group(cfg.train.device):  # joins torchrun's group; nothing when run alone
        summary = fit(cfg, resume=args.resume)
        if distributed.is_main():
            print(f"best val accuracy {summary['best_accuracy']:.4f}; run directory {summary['run_dir']}")
    return 0


def _evaluation_set(args, cfg: Config):
    """The labelled images ``patchgd evaluate`` scores: a CSV file, a folder holding ``--csv``, or a folder of
    class folders; labels are read with the checkpoint's classes."""
    from .data.datasets import ImageCSVDataset, ImageFolderDataset
    from .engine.data import read_options

    data = Path(args.data)
    if cfg.data.kind == "sequences":
        from .data.sequences import SequenceDataset

        return SequenceDataset(data if data.suffix == ".npz" else data / "val.npz", cfg.data.num_classes,
                               cfg.model.in_chans)
    read = read_options(cfg)
    csv_path = data if data.suffix == ".csv" else data / args.csv
    if csv_path.is_file() or data.suffix == ".csv":
        return ImageCSVDataset(csv_path, args.image_dir, num_classes=cfg.data.num_classes,
                               classes=cfg.data.classes, label_column=cfg.data.label_column,
                               id_column=cfg.data.id_column, **read)
    return ImageFolderDataset(data, classes=cfg.data.classes, **read)


def _require(path: str | Path, what: str) -> None:
    """``path`` exists, checked before torch loads so that a typo is reported at once."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist")


def cmd_evaluate(args) -> int:
    _require(args.checkpoint, what="checkpoint")
    import torch

    from .data.datasets import collate_images
    from .data.images import require_one_size
    from .engine.build import resolve_device
    from .engine.data import class_name
    from .engine.loop import evaluate
    from .inference import load_model

    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    dataset = _evaluation_set(args, cfg)
    if cfg.data.kind != "sequences" and cfg.data.image_size is None and args.batch_size > 1 \
            and cfg.method != "patchgd":
        require_one_size(dataset.paths, dataset.image_sizes)  # PatchGD gives each image its own grid
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_images)
    results = evaluate(model, loader, device, cfg.data.num_classes, cfg.train.amp)  # as the run evaluated
    results["confusion"] = results["confusion"].tolist()
    results["classes"] = [class_name(cfg, c) for c in range(cfg.data.num_classes)]
    if results["non_finite"]:
        print(f"warning: {results['non_finite']} of {len(dataset)} images got non-finite logits (a diverged "
              "checkpoint?); they count as wrong and are left out of the kappa and the confusion matrix",
              file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{len(dataset)} images: loss {results['loss']:.4f}  accuracy {results['accuracy']:.4f}  "
          f"qwk {results['qwk']:.4f}")
    width = max(8, *map(len, results["classes"]))
    print(f"  {'class':<{width}}  precision  recall      f1  images")
    per_class = results["per_class"]
    for c, name in enumerate(results["classes"]):
        print(f"  {name:<{width}}  {per_class['precision'][c]:9.4f}  {per_class['recall'][c]:6.4f}  "
              f"{per_class['f1'][c]:6.4f}  {per_class['support'][c]:6d}")
    print("confusion (rows = true class, columns = predicted):")
    for name, row in zip(results["classes"], results["confusion"]):
        print(f"  {name:<{width}}" + " ".join(f"{v:5d}" for v in row))
    return 0


def cmd_predict(args) -> int:
    _require(args.checkpoint, what="checkpoint")
    from .engine.build import resolve_device
    from .engine.data import class_name
    from .inference import load_input, load_model, predict, prediction

    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    explaining = args.heatmap is not None or args.z_image is not None
    if explaining and cfg.method != "patchgd":
        raise ValueError(f"--heatmap and --z-image explain PatchGD's latent grid Z; {args.checkpoint} is a "
                         f"{cfg.method} model")
    if not explaining:
        predictions = predict(model, cfg, args.images, device, progress=True)
    else:
        from .explain import write_evidence

        predictions, stems = [], set()
        for path in args.images:
            image, batch = load_input(path, cfg, device)
            name = Path(path).stem
            name = name if name not in stems else f"{name}-{len(predictions)}"
            stems.add(name)
            logits = write_evidence(model, batch, [image], [name], args.heatmap, args.z_image, args.heatmap_method,
                                    [class_name(cfg, c) for c in range(cfg.data.num_classes)])[0].logits
            predictions.append(prediction(cfg, path, logits))
    if args.json:
        print(json.dumps(predictions, indent=2))
    else:
        for p in predictions:
            ranked = sorted(range(len(p["probabilities"])), key=lambda c: -p["probabilities"][c])
            print(f"{p['image']}: {p['class_name']} (p={p['probabilities'][ranked[0]]:.3f})  "
                  + "  ".join(f"{class_name(cfg, c)} {p['probabilities'][c]:.3f}" for c in ranked))
    return 0


def cmd_inspect(args) -> int:
    from .data.readers import open_source
    from .data.tissue import tissue_cells
    from .plots import plot_slide_grid

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


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    out = args.out or str(Path("runs") / Path(args.spec).stem)
    rows = run_sweep(args.spec, out, devices=args.devices, slots=args.slots,
                     log=lambda line: print(line, flush=True))
    print((Path(out) / "results.md").read_text(), end="")
    return 0 if all(r["status"] == "done" for r in rows) else 1


def cmd_plan(args) -> int:
    from .engine.build import resolve_device
    from .engine.plan import plan_from_config

    cfg = _config_from_args(args)
    if args.budget:
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, budget=args.budget))
    if cfg.memory.budget is None:
        raise ConfigError("no memory budget: give --budget 4GB or set memory.budget in the config")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - progress, apart from the plan
    print(plan_from_config(cfg, resolve_device(cfg.train.device), args.processes, log=log).describe())
    return 0


def cmd_demo(args) -> int:
    from .cells import pretrain_on_cells
    from .data.digits import load_digits_source
    from .data.megapixel_mnist import PRESETS, generate_megapixel_mnist
    from .memory import format_size
    from .engine.trainer import fit

    cfg = load_config(PACKAGED_CONFIGS / "demo.yaml", args.set)
    out = Path(args.out)
    source = load_digits_source(args.digits)
    started = time.perf_counter()
    data = {key: getattr(args, key) if getattr(args, key) is not None else value
            for key, value in PRESETS["demo"].items()}
    data_dir = out / "data"
    if not (data_dir / "train.csv").exists():
        generate_megapixel_mnist(data_dir, digits=source, seed=cfg.train.seed, **data)
    print(f"data: Megapixel MNIST, {data['train']} / {data['val']} images of {data['image_size']} px "
          f"({source.description}): five 28 px digits each, three of the image's class, among {data['noise']} "
          f"scribbles; {cfg.model.patch_size} px patches")

    def next_free(name: str) -> Path:  # a second demo in the same folder reuses the data, not the runs
        path, attempt = out / name, 1
        while path.exists():
            attempt += 1
            path = out / f"{name}-{attempt}"
        return path

    backbone_from = None
    if args.pretrain_epochs:
        print(f"\npretraining the backbone as a classifier of single {cfg.model.patch_size} px cells "
              f"(the ten digits and background), {args.pretrain_epochs} epoch(s)")
        backbone_from = pretrain_on_cells(cfg, data_dir, out / f"cells{cfg.model.patch_size}", next_free("pretrain"),
                                          args.pretrain_epochs)
    cfg = dataclasses.replace(
        cfg, output_dir=str(next_free("run")),
        data=dataclasses.replace(cfg.data, root=str(data_dir)),
        model=dataclasses.replace(cfg.model, init_backbone=str(backbone_from) if backbone_from else None),
        # the last epoch draws the evidence of one validation image
        train=dataclasses.replace(cfg.train, heatmap_every=cfg.train.heatmap_every or cfg.train.epochs))
    print(f"\ntraining PatchGD end to end ({cfg.model.head} head"
          f"{', backbone from ' + str(backbone_from) if backbone_from else ', backbone from random weights'})")
    summary = fit(cfg)
    minutes = (time.perf_counter() - started) / 60
    run_dir = Path(summary["run_dir"])
    print(f"\ndemo done in {minutes:.1f} min: validation accuracy {summary['final_accuracy']:.3f} "
          f"(best {summary['best_accuracy']:.3f}; chance is {1 / cfg.data.num_classes:.3f}), "
          f"peak training-step memory {format_size(summary['peak_memory_bytes'])}")
    print(f"run directory: {run_dir} (config.yaml, metrics.csv, best.pt, last.pt)")
    print(f"learning curves: {run_dir / 'learning_curves.png'}")
    heatmaps = sorted((run_dir / "heatmaps").glob("*/*_heatmap.png"))
    if heatmaps:
        print(f"evidence per cell of a validation image: {heatmaps[-1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchgd", description=(
        "Train image classifiers end-to-end on very large images with Patch Gradient Descent "
        "(Gupta et al., TMLR 2024)."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p, required=True):
        p.add_argument("--config", required=required, help="YAML config file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")

    gen = sub.add_parser("generate", help="generate a synthetic data set")
    gen_sub = gen.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    um = gen_sub.add_parser("ultramnist", help="UltraMNIST: 3-5 digits per image, label = their sum")
    um.add_argument("out", help="output folder (written atomically)")
    um.add_argument("--train", type=int, required=True, help="number of training images")
    um.add_argument("--val", type=int, required=True, help="number of validation images")
    um.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 512)")
    um.add_argument("--digits", default=None,
                    help="MNIST folder in IDX format (default: scikit-learn's bundled digits)")
    um.add_argument("--preset", choices=["default", "original"], default=None,
                    help="'original' = the 4000 px, 28-class benchmark")
    um.add_argument("--seed", type=int, default=0)
    um.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    um.set_defaults(func=cmd_generate)
    mp = gen_sub.add_parser("megapixel-mnist", help="Megapixel MNIST: 5 digits on a large canvas, 3 of the class")
    mp.add_argument("out", help="output folder (written atomically)")
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
    mp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    mp.set_defaults(func=cmd_generate_megapixel)

    prep = sub.add_parser("prepare", help="prepare a real data set for training")
    prep_sub = prep.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    panda = prep_sub.add_parser("panda", help="PANDA: resize slides to N px squares, stratified folds")
    panda.add_argument("src", help="PANDA folder with train.csv and train_images/")
    panda.add_argument("out", help="output folder (written atomically)")
    panda.add_argument("--size", type=int, required=True, help="side N of the square images (512/2048/4096)")
    panda.add_argument("--folds", type=int, default=5, help="number of stratified folds")
    panda.add_argument("--seed", type=int, default=42)
    panda.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    panda.add_argument("--overwrite", action="store_true")
    panda.set_defaults(func=cmd_prepare)
    aeon = prep_sub.add_parser("aeon", help="a time-series data set bundled with the aeon package, for 1-D PatchGD "
                               "(data.kind: sequences)")
    aeon.add_argument("name", help="data set name, e.g. BasicMotions (multichannel: BasicMotions)")
    aeon.add_argument("out", help="output folder (written atomically): train.npz, val.npz, meta.json")
    aeon.add_argument("--overwrite", action="store_true")
    aeon.set_defaults(func=cmd_prepare_aeon)
    tcga = prep_sub.add_parser("tcga", help="TCGA diagnostic slides from a GDC sample sheet: labels by project, "
                               "folds grouped by patient")
    tcga.add_argument("sample_sheet", help="the GDC portal's sample sheet (TSV) of the downloaded slides")
    tcga.add_argument("out", help="output folder (written atomically): train.csv and slides/ (links)")
    tcga.add_argument("--slides", help="folder gdc-client downloaded into (<File ID>/<File Name>; default: the "
                      "sample sheet's folder)")
    tcga.add_argument("--projects", nargs="+", help="projects to keep and label by, e.g. TCGA-LUAD TCGA-LUSC "
                      "(default: every project in the sheet)")
    tcga.add_argument("--sample-types", nargs="+", default=["Primary Tumor"],
                      help="GDC sample types to keep (default: Primary Tumor)")
    tcga.add_argument("--all-sample-types", action="store_true", help="keep every sample type")
    tcga.add_argument("--folds", type=int, default=5, help="folds of the kfold column (default 5)")
    tcga.add_argument("--seed", type=int, default=42)
    tcga.add_argument("--overwrite", action="store_true")
    tcga.set_defaults(func=cmd_prepare_tcga)

    stats = sub.add_parser("stats", help="per-channel mean and std of a data set, for data.mean/data.std")
    stats.add_argument("folder", nargs="?", help="folder of images (its subfolders too); default: the training "
                       "images of --config")
    with_config(stats, required=False)
    stats.add_argument("--in-chans", type=int, default=1,
                       help="without --config: 1 (grayscale, default) or 3 (RGB)")
    stats.add_argument("--max-images", type=int, default=None, help="use a random subset of this size")
    stats.set_defaults(func=cmd_stats)

    train = sub.add_parser("train", help="train a model from a YAML config")
    with_config(train, required=False)
    train.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue the run in RUN_DIR at its next epoch, with its config.yaml (or --config) and --set; a "
        "config that differs from the checkpoint's is refused, except a larger train.epochs"))
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on a labelled data set")
    ev.add_argument("checkpoint", help="best.pt or last.pt of a run")
    ev.add_argument("--data", required=True,
                    help="a CSV file, a folder holding --csv, or a folder of class folders; for a sequence model, "
                         "a prepared folder (its val.npz) or an .npz file")
    ev.add_argument("--csv", default="val.csv", help="CSV inside --data (default val.csv)")
    ev.add_argument("--image-dir", default=None, help="image folder (default: beside the CSV, named like it)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=cmd_evaluate)

    pred = sub.add_parser("predict", help="predict the class of images (or whole-slide images) with a checkpoint")
    pred.add_argument("checkpoint", help="best.pt or last.pt of a run")
    pred.add_argument("images", nargs="+", help="image or slide files, read as the run's config says "
                      "(data.level/mpp, data.tissue)")
    pred.add_argument("--device", default="auto")
    pred.add_argument("--json", action="store_true",
                      help="print the predictions (class index and name, probabilities) as JSON")
    pred.add_argument("--heatmap", metavar="OUT_DIR", default=None,
                      help="write per image NAME_heatmap.png (per-cell evidence for the predicted class over the "
                           "image), NAME_heatmap.npy and NAME_heatmap.csv, and for a slide NAME.geojson (one QuPath tile "
                           "per tissue cell, level-0 coordinates, the evidence as measurements) (PatchGD models)")
    pred.add_argument("--heatmap-method", choices=("occlusion", "grad"), default="occlusion",
                      help="occlusion: drop of the class logit when a cell of Z holds the blank-patch code "
                           "(exact; default); grad: gradient x activation on Z")
    pred.add_argument("--z-image", metavar="OUT_DIR", default=None,
                      help="write per image NAME_z.png: Z's cells coloured by their first three principal "
                           "components (Fig. 5 of the paper)")
    pred.set_defaults(func=cmd_predict)

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

    plan = sub.add_parser("plan", help="fit a run into a memory budget and show the plan")
    with_config(plan)
    plan.add_argument("--budget", help="memory budget, e.g. 4GB (default: memory.budget of the config)")
    plan.add_argument("--processes", type=int, default=1, metavar="N",
                      help="data-parallel processes (torchrun --nproc_per_node x nodes) the run will use; the "
                           "budget and batch are per process, the global batch N times it (default 1)")
    plan.set_defaults(func=cmd_plan)

    sweep = sub.add_parser("sweep", help="run a grid of config overrides, queued over devices, with a results "
                           "table (resumable)")
    sweep.add_argument("spec", help="sweep spec (YAML): base config, set, grid and/or points")
    sweep.add_argument("--out", help="sweep folder (default runs/<spec name>): runs/, logs/, status/, results.csv/.md")
    sweep.add_argument("--devices", nargs="+", metavar="DEVICE",
                       help="cuda:0 cuda:1 ... (one run per GPU at a time) or cpu (default: every GPU, else cpu)")
    sweep.add_argument("--slots", type=int, default=1,
                       help="runs side by side on the CPU, its threads split between them (default 1)")
    sweep.set_defaults(func=cmd_sweep)

    demo = sub.add_parser("demo", help="generate a small Megapixel MNIST set and train PatchGD on it (CPU, minutes)")
    demo.add_argument("--digits", default=None,
                      help="MNIST folder in IDX format (default: scikit-learn's bundled digits)")
    demo.add_argument("--out", default="patchgd-demo", help="folder for the data and the runs")
    demo.add_argument("--train", type=int, default=None, help="training images (default: the demo preset's)")
    demo.add_argument("--val", type=int, default=None, help="validation images (default: the demo preset's)")
    demo.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the demo preset's)")
    demo.add_argument("--noise", type=int, default=None, help="scribbles per image (default: the demo preset's)")
    demo.add_argument("--pretrain-epochs", type=int, default=2,
                      help="epochs of backbone pretraining on single cells before PatchGD (default 2; 0: none)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the demo config (configs/demo.yaml)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="speed, memory and accuracy benchmarks")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    from .bench import register_all

    register_all(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_with_benchmarks(build_parser(), argv)
    # Under torchrun every process prints its own error; the rank says which one failed first.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f"patchgd {args.command}" + (f" (rank {os.environ.get('RANK')} of {world})" if world > 1 else "")
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        # One line: an error from deep inside a library can span several (torch's safe-loader advice).
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{who}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
