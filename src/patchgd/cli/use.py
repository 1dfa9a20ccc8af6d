"""``patchgd evaluate`` and ``predict``: a trained model on labelled data and on new images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import Config
from ..registry import patch_method
from .common import require


def evaluation_set(args, cfg: Config):
    """The labelled images ``patchgd evaluate`` scores and what they are, in words: the run's own validation set
    when ``--data`` is the run's ``data.root`` (unless ``--all``); else a CSV file, a folder holding ``--csv``,
    or a folder of class folders, read with the checkpoint's classes."""
    from ..data.datasets import ImageCSVDataset, ImageFolderDataset
    from ..data.layouts import read_csv
    from ..engine.data import build_datasets, read_options

    data = Path(args.data)
    if cfg.data.kind == "sequences":
        from ..data.sequences import SequenceDataset

        path = data if data.suffix == ".npz" else data / "val.npz"
        return SequenceDataset(path, cfg.data.num_classes, cfg.model.in_chans), f"every sequence of {path}"
    if not args.all and cfg.data.root is not None and data.resolve() == Path(cfg.data.root).resolve():
        # The run's own folder holds its training images too: score what it held out, split as it was.
        held_out = build_datasets(cfg)[1]
        return held_out, (f"the run's validation set ({held_out.origin}), held out from training as the run "
                          "split its data (split.csv); --all scores every image")
    read = read_options(cfg)
    csv_path = data if data.suffix == ".csv" else data / args.csv
    if csv_path.is_file() or data.suffix == ".csv":
        group = cfg.data.group_column  # patients, for intervals by patient, where the CSV names them
        grouped = group is not None and csv_path.is_file() and group in read_csv(csv_path)[1]
        dataset = ImageCSVDataset(csv_path, args.image_dir, num_classes=cfg.data.num_classes,
                                  classes=cfg.data.classes, label_column=cfg.data.label_column,
                                  id_column=cfg.data.id_column, group_column=group if grouped else None, **read)
        return dataset, f"every image of {csv_path}"
    return ImageFolderDataset(data, classes=cfg.data.classes, **read), f"every image of {data}"


def trained_on(checkpoint: str | Path, cfg: Config, paths) -> int:
    """How many of ``paths`` trained the checkpoint's model, by the run's ``split.csv`` beside it (0 without)."""
    import csv

    from ..rundir import SPLIT_FILE

    split = Path(checkpoint).parent / SPLIT_FILE
    if not split.is_file() or cfg.data.root is None:
        return 0
    root = Path(cfg.data.root).resolve()  # split.csv names images relative to it
    with split.open(newline="") as f:
        training = {(root / row["image"]).resolve() for row in csv.DictReader(f) if row["split"] == "train"}
    return sum(Path(p).resolve() in training for p in paths)


def cmd_evaluate(args) -> int:
    require(args.checkpoint, what="checkpoint")
    import torch

    from ..data.datasets import collate_images
    from ..data.images import require_one_size
    from ..engine.build import resolve_device
    from ..engine.data import class_name
    from ..engine.loop import evaluate
    from ..engine.report import scores, write_pictures, write_predictions
    from ..inference import load_model
    from ..metrics import probabilities

    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    dataset, scored = evaluation_set(args, cfg)
    seen = trained_on(args.checkpoint, cfg, getattr(dataset, "paths", []))
    if seen:
        print(f"warning: {seen} of the {len(dataset)} images scored trained this model ({Path(args.checkpoint).parent} "
              "/ split.csv): the scores are optimistic; score held-out images (--data with the run's data.root "
              "scores its validation set)", file=sys.stderr)
    if cfg.data.kind != "sequences" and cfg.data.image_size is None and args.batch_size > 1 \
            and not patch_method(cfg.method):
        require_one_size(dataset.paths, dataset.image_sizes)  # PatchGD gives each image its own grid
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_images)
    results = evaluate(model, loader, device, cfg.data.num_classes, cfg.train.amp)  # as the run evaluated
    classes = [class_name(cfg, c) for c in range(cfg.data.num_classes)]
    resamples = cfg.train.bootstrap if args.bootstrap is None else args.bootstrap
    out = scores(results, classes, resamples=resamples, seed=cfg.train.seed, groups=getattr(dataset, "groups", None))
    out["scored"] = {"images": len(dataset), "set": scored, "training_images": seen}
    images = [str(p) for p in getattr(dataset, "paths", range(len(dataset)))]
    if args.predictions:
        write_predictions(args.predictions, images, probabilities(results["logits"]), classes, results["labels"])
    if args.pictures:
        Path(args.pictures).mkdir(parents=True, exist_ok=True)
        write_pictures(args.pictures, "", results, classes, f"{Path(args.checkpoint).name} on {len(dataset)} images")
    if out["non_finite"]:
        print(f"warning: {out['non_finite']} of {len(dataset)} images got non-finite logits (a diverged "
              "checkpoint?); they count as wrong and are left out of the kappa and the confusion matrix",
              file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"scored {len(dataset)} images: {scored}")
    print(scores_table(out))
    width = max(8, *map(len, classes))
    print(f"  {'class':<{width}}  precision  recall      f1   auroc  images")
    per_class = out["per_class"]
    for c, name in enumerate(classes):
        auroc = out["auroc_per_class"][c]
        print(f"  {name:<{width}}  {per_class['precision'][c]:9.4f}  {per_class['recall'][c]:6.4f}  "
              f"{per_class['f1'][c]:6.4f}  {'     -' if auroc is None else f'{auroc:6.4f}'}  {per_class['support'][c]:6d}")
    print("confusion (rows = true class, columns = predicted):")
    for name, row in zip(classes, out["confusion"]):
        print(f"  {name:<{width}}" + " ".join(f"{v:5d}" for v in row))
    return 0


def scores_table(scored: dict) -> str:
    """The metrics of :func:`patchgd.engine.report.scores`, one per line, with their intervals."""
    intervals = scored.get("intervals") or {}
    by = (f"  (95 % intervals: {intervals['resamples_used']['accuracy']} bootstrap resamples by {intervals['by']})"
          if intervals else "")
    lines = [f"loss {scored['loss']:.4f}{by}"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "qwk"):
        value, low_high = scored[name], intervals.get(name)
        shown = "undefined" if value is None else f"{value:.4f}"
        lines.append(f"  {name.replace('_', ' '):<18} {shown}" + (f"  [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""))
    if scored.get("auroc_note"):
        lines.append(f"  ({scored['auroc_note']})")
    return "\n".join(lines)


def cmd_predict(args) -> int:
    require(args.checkpoint, what="checkpoint")
    from ..engine.build import resolve_device
    from ..engine.data import class_name
    from ..inference import load_input, load_model, predict, prediction

    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    explaining = args.heatmap is not None or args.z_image is not None
    if explaining and not patch_method(cfg.method):
        raise ValueError(f"--heatmap and --z-image explain PatchGD's latent grid Z; {args.checkpoint} is a "
                         f"{cfg.method} model")
    if not explaining:
        predictions = predict(model, cfg, args.images, device, progress=True)
    else:
        from ..heatmaps import write_evidence

        predictions, stems = [], set()
        for path in args.images:
            image, batch = load_input(path, cfg, device)
            name = Path(path).stem
            name = name if name not in stems else f"{name}-{len(predictions)}"
            stems.add(name)
            logits = write_evidence(model, batch, [image], [name], args.heatmap, args.z_image, args.heatmap_method,
                                    [class_name(cfg, c) for c in range(cfg.data.num_classes)])[0].logits
            predictions.append(prediction(cfg, path, logits))
    if args.predictions:
        from ..engine.report import write_predictions

        write_predictions(args.predictions, [p["image"] for p in predictions],
                          [p["probabilities"] for p in predictions], [class_name(cfg, c) for c in range(cfg.data.num_classes)])
    if args.json:
        print(json.dumps(predictions, indent=2))
    else:
        for p in predictions:
            ranked = sorted(range(len(p["probabilities"])), key=lambda c: -p["probabilities"][c])
            print(f"{p['image']}: {p['class_name']} (p={p['probabilities'][ranked[0]]:.3f})  "
                  + "  ".join(f"{class_name(cfg, c)} {p['probabilities'][c]:.3f}" for c in ranked))
    return 0


def register(sub) -> None:
    """Add ``evaluate`` and ``predict`` to the ``patchgd`` command's subparsers ``sub``."""
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on a labelled data set")
    ev.add_argument("checkpoint", help="best.pt or last.pt of a run")
    ev.add_argument("--data", required=True,
                    help="the run's own data.root (its validation set is scored: the images split.csv held out), "
                         "a CSV file, a folder holding --csv, or a folder of class folders; for a sequence model, "
                         "a prepared folder (its val.npz) or an .npz file")
    ev.add_argument("--csv", default="val.csv", help="CSV inside --data (default val.csv)")
    ev.add_argument("--all", action="store_true",
                    help="with --data the run's own data.root: score every image in it, training images "
                         "included, instead of the validation set the run held out")
    ev.add_argument("--image-dir", default=None, help="image folder (default: beside the CSV, named like it)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--bootstrap", type=int, default=None, metavar="N",
                    help="bootstrap resamples of the 95 %% intervals (default: train.bootstrap of the run, 1000; 0: "
                         "none); by patient where the data has data.group_column")
    ev.add_argument("--predictions", metavar="CSV", default=None,
                    help="write one row per image: image, label, predicted class, each class's probability")
    ev.add_argument("--pictures", metavar="DIR", default=None, help="write roc.png and confusion.png into DIR")
    ev.set_defaults(func=cmd_evaluate)

    pred = sub.add_parser("predict", help="predict the class of images (or whole-slide images) with a checkpoint")
    pred.add_argument("checkpoint", help="best.pt or last.pt of a run")
    pred.add_argument("images", nargs="+", help="image or slide files, read as the run's config says "
                      "(data.level/mpp, data.tissue)")
    pred.add_argument("--device", default="auto")
    pred.add_argument("--json", action="store_true",
                      help="print the predictions (class index and name, probabilities) as JSON")
    pred.add_argument("--predictions", metavar="CSV", default=None,
                      help="write one row per image: image, predicted class, each class's probability")
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
