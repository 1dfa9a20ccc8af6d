"""Exact, cached, two-stage or sub-bag: the cost and the accuracy of each way to train on large images.

Megapixel MNIST (real MNIST digits) at ``--image-size`` px with 64 px patches, the scaled preset's density
of scribbles; every arm starts from the same backbone, pretrained for 2 epochs on the training images'
cells (App. C with digit labels), and trains ``--epochs`` epochs with the demo's recipe (attention head,
ε = 1, Adam 2e-3 with the backbone at 2e-4, fill in eval mode):

===================  =============================================================================
exact 1.0            PatchGD, Algorithm 1: every step fills every cell, then ζ = 4 inner iterations of k
exact 0.25           the same with max_sampled 0.25: ζ = 1
cached 1.0 / 0.25    ``patchgd.fill: cached``: Z persists, the sampled cells are re-encoded and written back
cached+refresh       ``cached 0.25`` with ``patchgd.refresh`` N/8 of the oldest cells per image and step
two-stage            ``model.freeze: all`` + cached: the store holds the encoder's features
sub-bag              ``method: subbag``: k random cells per image, the head on those alone
downscaled GD        GD on the images resized to 256 px
===================  =============================================================================

Per arm: best and final validation accuracy, McNemar's exact test against ``exact 1.0`` (paired, on the
validation images), training time of the first and of later epochs (evaluation aside), cells encoded per
epoch with and without gradients, the step's tensor peak, the process's peak RSS and the store's size.
The arms run one after another in this process and are skipped when already done (rerun to resume); the
report holds every arm that has finished in ``--out``. ``--arms`` also runs the probes (``probes``), arms
that test what would bring the cached fill to exact's accuracy.

Usage (one command per size and seed; ``--threads 1`` pins one core), then one table of the seeds::

    python -m benchmarks.cost_study --image-size 1024 --seed 0 --threads 1 --out bench-results/cost-1024-seed0
    python -m benchmarks.cost_study --combine bench-results/cost-1024-seed0 bench-results/cost-1024-seed1
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchgd.cells import pretrain_on_cells
from patchgd.config import load_config, save_config
from patchgd.data.prepare.megapixel_mnist import generate_megapixel_mnist
from patchgd.engine.trainer import fit
from patchgd.io import atomic_file
from patchgd.memory import format_size

from ._common import SHARED_MNIST

PATCH = 64
NOISE_PER_PIXEL = 50 / 1500**2  # Megapixel MNIST's density of scribbles


def arms(cells: int) -> dict[str, dict]:
    """Each arm's overrides of the base config (dotted keys)."""
    k = cells // 4
    return {
        "exact 1.0": {},
        "exact 0.25": {"patchgd.max_sampled": 0.25},
        "cached 1.0": {"patchgd.fill": "cached"},
        "cached 0.25": {"patchgd.fill": "cached", "patchgd.max_sampled": 0.25},
        "cached+refresh 0.25": {"patchgd.fill": "cached", "patchgd.max_sampled": 0.25, "patchgd.refresh": cells // 8},
        "two-stage": {"patchgd.fill": "cached", "model.freeze": "all"},
        "sub-bag": {"method": "subbag", "patchgd.patches_per_step": k},
        "downscaled GD": {"method": "gd", "data.image_size": 256, "model.head": "conv"},
    }


def probes(cells: int) -> dict[str, dict]:
    """Arms run only when named (``--arms``): what would bring the cached fill to exact's accuracy. Each
    lever of the staleness (how far the encoder moves between two encodes of a cell): a larger refresh, so
    that every cell is re-encoded at least every other visit; a backbone learning rate a quarter of the
    recipe's, against exact at that rate."""
    slow = {"patchgd.max_sampled": 0.25, "train.backbone_lr": 5e-5}
    return {
        "cached+refresh N/4 0.25": {"patchgd.fill": "cached", "patchgd.max_sampled": 0.25, "patchgd.refresh": cells // 4},
        "exact 0.25 slow": slow,
        "cached 0.25 slow": {**slow, "patchgd.fill": "cached"},
    }


def base_config(args, data: Path, out: Path):
    """The demo's recipe on this data (its mean/std: the same density of digits and scribbles)."""
    return load_config("demo", [
        f"data.root={data}", "data.num_classes=10", f"model.patch_size={PATCH}", f"train.epochs={args.epochs}",
        f"train.seed={args.seed}", "train.heatmap_every=0", "train.bootstrap=0",
        f"train.threads={args.threads or 'null'}", f"output_dir={out}"])


def store_size(run: Path) -> str | None:
    """The Z store's size, as the run's log said it (cached arms)."""
    line = next((line for line in (run / "train.log").read_text().splitlines() if "Z store: " in line
                 and " images, " in line), None)
    return None if line is None else line.rsplit(": ", 1)[1].split(" in ")[0]


def read_metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def reference(name: str) -> str | None:
    """The exact arm an arm is compared with: the one that samples as much of each image per step (sub-bag's
    k is exact 0.25's; two-stage and downscaled GD, which sample nothing, are held to exact 1.0)."""
    if name == "exact 1.0":
        return None
    if name == "cached 0.25 slow":
        return "exact 0.25 slow"
    if name == "sub-bag" or ("0.25" in name and name != "exact 0.25"):
        return "exact 0.25"
    return "exact 1.0"


def val_correct(run: Path) -> np.ndarray:
    """Whether each validation image (val.csv's order) is right by the run's best.pt; kept beside it."""
    import patchgd
    from patchgd.engine.data import build_datasets

    kept = run / "val_correct.npy"
    if kept.exists() and kept.stat().st_mtime >= (run / "best.pt").stat().st_mtime:
        return np.load(kept)
    model, cfg = patchgd.load_model(run / "best.pt")
    val = build_datasets(cfg)[1]
    right = []
    with torch.inference_mode():
        for i in range(len(val)):
            image, label = val[i]
            batch = image[None] if isinstance(image, torch.Tensor) else [image]
            right.append(int(model(batch).argmax()) == label)
    with atomic_file(kept) as tmp, tmp.open("wb") as f:
        np.save(f, np.array(right))
    return np.array(right)


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Images right only by ``a``, only by ``b``, and McNemar's exact two-sided p."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


def combine(outs: list[Path]) -> str:
    """One table of the studies in ``outs`` (the seeds of one size): per arm and seed, the best accuracy, its
    distance from its exact arm's in that arm's binomial standard errors, McNemar's p against it, and the
    training time of later epochs as a share of its exact arm's."""
    studies = [json.loads((out / "study.json").read_text()) for out in outs]
    seeds = " / ".join(str(study["args"]["seed"]) for study in studies)
    sizes = {study["args"]["image_size"] for study in studies}
    lines = [f"Megapixel MNIST {' and '.join(map(str, sorted(sizes)))} px, seeds {seeds} (each cell: seed by seed)",
             "", "| arm | best acc | vs its exact, in SE | McNemar p | train s later epochs | / its exact's |",
             "|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(name for study in studies for name in study["arms"]))
    for name in names:
        cells = {key: [] for key in ("acc", "se", "p", "time", "ratio")}
        for study in studies:
            row = study["arms"].get(name)
            exact = study["arms"].get(reference(name)) if row else None
            n = study["args"]["val"]
            cells["acc"].append("-" if row is None else f"{row['best_accuracy']:.3f}")
            cells["time"].append("-" if row is None or row["train_time_later_s"] is None
                                 else f"{row['train_time_later_s']:.0f}")
            if exact is None:
                for key in ("se", "p", "ratio"):
                    cells[key].append("-")
                continue
            q = exact["best_accuracy"]
            se = (q * (1 - q) / n) ** 0.5
            cells["se"].append(f"{(row['best_accuracy'] - q) / se:+.1f}")
            cells["p"].append(f"{row['mcnemar_vs_exact'][2]:.2g}")
            cells["ratio"].append("-" if not row["train_time_later_s"] or not exact["train_time_later_s"]
                                  else f"{row['train_time_later_s'] / exact['train_time_later_s']:.3f}")
        label = name if reference(name) is None else f"{name} (vs {reference(name)})"
        lines.append("| " + " | ".join([label, *(" / ".join(cells[k]) for k in cells)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512, help="canvas side, a multiple of 64 (default 512)")
    parser.add_argument("--train", type=int, default=600, help="training images (default 600)")
    parser.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every arm (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: one core per study)")
    parser.add_argument("--arms", nargs="+", default=None, help="run these arms only (default: all)")
    parser.add_argument("--digits", default=str(SHARED_MNIST), help="MNIST folder of IDX files")
    parser.add_argument("--out", default="bench-results/cost-study", help="folder: data, runs, study.json/.md")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="OUT",
                        help="run nothing: print one table of these studies' study.json (the seeds of a size)")
    args = parser.parse_args(argv)
    if args.combine:
        print(combine(args.combine), end="")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    noise = round(NOISE_PER_PIXEL * args.image_size**2)
    if not (data / "train.csv").exists():
        generate_megapixel_mnist(data, train=args.train, val=args.val, image_size=args.image_size, noise=noise,
                                 digits=args.digits, seed=args.seed, progress=False)
    base = out / "base.yaml"
    save_config(base_config(args, data, out / "runs" / "cells"), base)
    cells_ckpt = out / "runs" / "pretrain" / "best.pt"
    if not cells_ckpt.exists():
        cells_ckpt = pretrain_on_cells(load_config(base), data, out / "cells", out / "runs" / "pretrain", 2)
    cells = (args.image_size // PATCH) ** 2
    table = {}
    known = {**arms(cells), **probes(cells)}
    unknown = set(args.arms or ()) - set(known)
    if unknown:
        parser.error(f"--arms {' '.join(sorted(unknown))}: expected some of {', '.join(known)}")
    for name, overrides in known.items():
        run = out / "runs" / name.replace(" ", "_").replace("+", "_").replace("/", "")
        finished = (run / "metrics.csv").exists() and len(read_metrics(run)) >= args.epochs
        if not finished and name not in (args.arms or arms(cells)):
            continue  # not asked for, and not run before: a report keeps every arm that finished
        if not finished:
            sets = [f"{key}={value}" for key, value in overrides.items()]
            arm_cfg = load_config(base, [*sets, f"model.init_backbone={cells_ckpt}", f"output_dir={run}"])
            print(f"== {name}: {' '.join(sets) or 'the base'}", flush=True)
            started = time.perf_counter()
            fit(arm_cfg, resume=run if (run / "last.pt").exists() else None, log=lambda line: print(line, flush=True))
            print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
        rows = read_metrics(run)
        saved = json.loads((run / "eval.json").read_text())
        table[name] = {
            "best_accuracy": max(float(r["val_accuracy"]) for r in rows if r["val_accuracy"]),
            "final_accuracy": float(rows[-1]["val_accuracy"]),
            "val_accuracy_per_epoch": [float(r["val_accuracy"]) for r in rows],
            "train_time_first_s": float(rows[0]["train_time_s"]),
            "train_time_later_s": float(np.mean([float(r["train_time_s"]) for r in rows[1:]])) if len(rows) > 1 else None,
            "encoded_with_grad_per_epoch": [int(r["encoded_with_grad"]) for r in rows],
            "encoded_no_grad_per_epoch": [int(r["encoded_no_grad"]) for r in rows],
            "step_peak_bytes": max(int(float(r["peak_memory_bytes"])) for r in rows),
            "process_peak_bytes": max(int(float(r["peak_process_bytes"])) for r in rows),
            "store": store_size(run), "best_epoch": saved["best_epoch"], "run_dir": str(run)}
    for name, row in table.items():
        exact = reference(name)
        if exact in table:
            row["reference"] = exact
            row["mcnemar_vs_exact"] = mcnemar(val_correct(Path(row["run_dir"])),
                                              val_correct(Path(table[exact]["run_dir"])))
    write_report(out, args, table)
    return 0


def write_report(out: Path, args, table: dict) -> None:
    headers = ["arm", "best acc", "final acc", "McNemar vs exact (only arm / only exact, p)",
               "train s, epoch 1", "train s, later", "encoded/epoch with grad", "without grad", "step peak",
               "process RSS", "store"]
    lines = [f"# Cost study: Megapixel MNIST {args.image_size} px, seed {args.seed}, {args.train} / {args.val} "
             f"images, {args.epochs} epochs", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, r in table.items():
        m = r.get("mcnemar_vs_exact")
        lines.append("| " + " | ".join([
            name, f"{r['best_accuracy']:.3f}", f"{r['final_accuracy']:.3f}",
            "-" if m is None else f"{r['reference']}: {m[0]} / {m[1]}, p {m[2]:.3g}", f"{r['train_time_first_s']:.0f}",
            "-" if r["train_time_later_s"] is None else f"{r['train_time_later_s']:.0f}",
            f"{r['encoded_with_grad_per_epoch'][-1]:,}", f"{r['encoded_no_grad_per_epoch'][0]:,} / "
            f"{r['encoded_no_grad_per_epoch'][-1]:,}", format_size(r["step_peak_bytes"]),
            format_size(r["process_peak_bytes"]), r["store"] or "-"])
            + " |")
    lines += ["", "Encoded without gradients: first / last epoch (training only; evaluation encodes every cell of "
              "the validation set with the current weights in every arm)."]
    with atomic_file(out / "study.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_file(out / "study.json") as tmp:
        tmp.write_text(json.dumps({"args": vars(args), "arms": table}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
