"""The paper's trade on UltraMNIST: full-resolution GD does not fit, downscaled GD loses the digits, PatchGD.

One memory budget, set where full-resolution GD fits at most batch 1 (``--budget auto``: midway between
GD's measured batch-1 and batch-2 step peaks). Under it, with the same backbone,
epochs, learning-rate schedule and seed, four arms train with :func:`patchgd.engine.trainer.fit`:

1. ``patchgd``: PatchGD from scratch; the planner gives it the largest batch ``B`` that fits.
2. ``gd full-res accum``: GD at full resolution in batches of ``B`` split into the largest micro-batch
   that fits (``train.micro_batch_size``), gradients accumulated to one update per batch, as the paper
   tried; the same number of updates as PatchGD.
3. ``gd low-res``: GD on images downscaled (``data.image_size``) to the largest side, in steps of
   ``--size-step`` px, at which batch ``B`` fits.
4. ``patchgd init low-res gd``: PatchGD whose backbone starts from arm 3's best checkpoint (App. C).

An arm whose smallest setting exceeds the budget (full-resolution GD when even micro-batch 1 does not fit,
with ``--budget`` below its batch-1 peak) is reported as not fitting and the others still run.

UltraMNIST images are generated from real MNIST at ``--image-size`` (default 256 px) with the generator's
full digit-scale range for that size (smallest digits 14 px); ``--task megapixel-mnist`` generates Megapixel
MNIST instead (five 28 px digits, three of the class, ``--noise`` scribbles), where downscaling erases
the digits. ``--head`` and ``--grad-accum-steps`` set PatchGD's head and ``ε`` in both PatchGD arms.

``--pretrain-cells N`` (Megapixel MNIST) first trains the backbone for ``N`` epochs as a classifier of the
training images' PatchGD cells (:func:`patchgd.cells.pretrain_on_cells`) and starts *every* arm from it,
the GD arms included, so that the arms differ in method and resolution only (the paper starts all of them
from ImageNet weights); ``--backbone-lr`` then moves that backbone slower than the new layers in every arm.
Writes ``study.json``, ``study.md`` and ``study_curves.png`` to ``--out``. One command per seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from patchgd.cells import pretrain_on_cells
from patchgd.data.prepare.megapixel_mnist import generate_megapixel_mnist
from patchgd.data.prepare.ultramnist import default_max_scale
from patchgd.config import Config
from patchgd.io import atomic_file
from patchgd.memory import format_size, parse_size
from patchgd.engine.plan import BudgetError, plan_budget
from ._common import main_of, format_table, machine, write_json
from .ultramnist import PAPER_4GB, SHARED_MNIST, base_config, gd_peaks, markdown, prepare, train_run, variant
from patchgd.rundir import BEST_CHECKPOINT

QUICK = dict(train=16, val=8, image_size=128, grid=2, epochs=1, max_batch=4, size_step=16)
ARMS = ("patchgd", "gd full-res accum", "gd low-res", "patchgd init low-res gd")
TASKS = {"ultramnist": "UltraMNIST", "megapixel-mnist": "Megapixel MNIST"}


def register(subparsers) -> None:
    """Add the ``ultramnist_study`` subcommand."""
    parser = subparsers.add_parser("ultramnist_study", help="PatchGD vs full-resolution GD with accumulation vs "
                                   "downscaled GD vs PatchGD from the downscaled GD, under one tight budget",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default=str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None,
                        help="MNIST folder of IDX files (default: the shared MNIST beside this repo if present, "
                             "else scikit-learn's bundled digits, with a warning)")
    parser.add_argument("--out", default="bench-results/ultramnist-study", help="output folder (data, runs, report)")
    parser.add_argument("--task", choices=TASKS, default="ultramnist",
                        help="the data set generated (default ultramnist)")
    parser.add_argument("--noise", type=int, default=2, help="megapixel-mnist: scribbles per image (default 2)")
    parser.add_argument("--head", choices=("conv", "transformer", "attention"), default="conv",
                        help="PatchGD's head (default conv, the paper's)")
    parser.add_argument("--grad-accum-steps", type=int, default=None,
                        help="PatchGD's epsilon (default: zeta, one update per batch)")
    parser.add_argument("--pretrain-cells", type=int, default=0, metavar="EPOCHS",
                        help="megapixel-mnist: start every arm from a backbone pretrained for this many epochs on "
                             "the training images' cells (default 0: random weights)")
    parser.add_argument("--backbone-lr", type=float, default=None,
                        help="peak rate of the backbone in every arm (train.backbone_lr; default: --lr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every arm (default 10)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--train", type=int, default=1500, help="training images (default 1500)")
    parser.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    parser.add_argument("--backbone", default="test_resnet", help="timm backbone of every arm (default test_resnet)")
    parser.add_argument("--width", type=int, default=64, help="PatchGD's latent size s and head width (default 64)")
    parser.add_argument("--grid", type=int, default=4, help="PatchGD patches per side (default 4: 64 px patches "
                        "of 256 px images)")
    parser.add_argument("--budget", default="auto",
                        help="memory budget such as 40MB; 'auto': midway between GD's full-resolution batch-1 "
                             "and batch-2 step peaks (default)")
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch PatchGD may get (default 16)")
    parser.add_argument("--size-step", type=int, default=16,
                        help="the low-resolution GD side is searched in steps of this many pixels (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, Adam (default 2e-3)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 for one core per study)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (seconds), for tests: "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.set_defaults(func=run)


def choose_budget(args: argparse.Namespace, peaks: dict[int, int]) -> int:
    """The budget in bytes: given, or midway between GD's batch-1 and batch-2 peaks, so that full-resolution
    GD fits batch 1 only."""
    return parse_size(args.budget) if args.budget != "auto" else (peaks[1] + peaks[2]) // 2


def low_resolution(cfg, batch_size: int, image_size: int, step: int, budget: int) -> tuple[int, dict[int, int]]:
    """The largest side ``r`` (a multiple of ``step``, below ``image_size``) at which GD fits ``batch_size``
    images under ``budget``, by bisection over the planner's verdicts; also each tried side's batch."""
    tried: dict[int, int] = {}

    def fits(steps: int) -> bool:
        side = steps * step
        try:
            plan = plan_budget(variant(cfg, method="gd", budget=budget), (1, side, side), "cpu",
                               max_batch_size=batch_size)
            tried[side] = plan.batch_size
        except BudgetError:
            tried[side] = 0
        return tried[side] == batch_size

    good, bad = 0, (image_size - 1) // step + 1  # invariant: good fits (or is 0), bad does not
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    if good == 0:
        raise BudgetError(f"GD fits batch {batch_size} at no side of at least {step} px under "
                          f"{format_size(budget)}")
    return good * step, tried


def plot(records: list[dict], budget: int, image_size: int, task: str, png: Path) -> None:
    """Validation accuracy per epoch of the four arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in filter(lambda r: r["fits"], records):
        curve = r["val_accuracy_per_epoch"]
        ax.plot(range(1, len(curve) + 1), curve, "o-", label=f"{r['name']} ({r['resolution']} px, batch "
                f"{r['batch_size']}" + (f", micro {r['micro_batch_size']}" if r["micro_batch_size"] else "") + ")")
    ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
    ax.set(title=f"{task} {image_size} px, budget {format_size(budget)}", xlabel="epoch",
           ylabel="val accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def table(records: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["arm", "px", "batch", "micro", "peak", "best acc", "final acc", "best qwk", "final qwk", "wall s"]
    rows = [[r["name"], r["resolution"], r["batch_size"], r["micro_batch_size"] or "-",
             format_size(r["peak_memory_bytes"]), f"{r['best_accuracy']:.4f}", f"{r['final_accuracy']:.4f}",
             f"{r['best_qwk']:.4f}", f"{r['final_qwk']:.4f}", r["wall_s"]] if r["fits"] else
            [r["name"], r["resolution"] or "-", "-", "-", "does not fit", "-", "-", "-", "-", "-"] for r in records]
    return headers, rows


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    def megapixel(folder: Path) -> Path:
        return generate_megapixel_mnist(folder, train=args.train, val=args.val, image_size=args.image_size,
                                        noise=args.noise, digits=args.digits, seed=args.seed, overwrite=True,
                                        progress=False)

    if args.pretrain_cells and args.task != "megapixel-mnist":
        raise SystemExit("--pretrain-cells needs --task megapixel-mnist (its digits' places label the cells)")
    data_root = prepare(args, QUICK, megapixel if args.task == "megapixel-mnist" else None)
    out = Path(args.out)
    cfg = variant(base_config(args, data_root), train={"backbone_lr": args.backbone_lr})
    if args.pretrain_cells:
        print(f"pretraining the backbone on the training images' {cfg.model.patch_size} px cells, "
              f"{args.pretrain_cells} epoch(s)", flush=True)
        cells = pretrain_on_cells(cfg, data_root, out / "cells", out / "runs" / "pretrain_cells", args.pretrain_cells)
        cfg = variant(cfg, model={"init_backbone": str(cells)})
    gd = variant(cfg, model={"head": "conv"})  # GD classifies with its own linear layer: --head is PatchGD's
    full = (1, args.image_size, args.image_size)
    peaks = gd_peaks(gd, full, 2)
    budget = choose_budget(args, peaks)
    print(f"GD full-resolution step peak: batch 1 {format_size(peaks[1])}, batch 2 {format_size(peaks[2])}; "
          f"budget {format_size(budget)}", flush=True)

    def arm(name: str, base: Config, **changes) -> dict:
        """Train one arm; an arm whose smallest setting exceeds the budget is recorded as not fitting."""
        run_cfg = variant(base, budget=budget, output_dir=out / "runs" / name.replace(" ", "_"), **changes)
        try:
            record = train_run(run_cfg, name, format_size(budget)) | {"fits": True}
        except BudgetError as err:
            if name == "patchgd":  # every other arm is set by PatchGD's batch
                raise
            print(f"== {format_size(budget)} {name}: does not fit: {err}", flush=True)
            return not_fitting(name, run_cfg.data.image_size or args.image_size, str(err))
        record["resolution"] = record.pop("image_size") or args.image_size
        return record

    def not_fitting(name: str, resolution: int | None, reason: str) -> dict:
        return {"name": name, "fits": False, "reason": reason, "resolution": resolution}

    records = [arm("patchgd", cfg, method="patchgd")]
    batch = records[0]["batch_size"]
    records.append(arm("gd full-res accum", gd, method="gd", train={"batch_size": batch, "micro_batch_size": batch}))
    try:
        side, tried = low_resolution(gd, batch, args.image_size, args.size_step, budget)
    except BudgetError as err:
        tried, low = {}, not_fitting("gd low-res", None, str(err))
    else:
        print(f"GD at batch {batch} fits up to {side} px (tried: " +
              ", ".join(f"{s} px -> batch {b}" for s, b in sorted(tried.items())) + ")", flush=True)
        low = arm("gd low-res", gd, method="gd", train={"batch_size": batch}, data={"image_size": side})
    records += [low, arm("patchgd init low-res gd", cfg, method="patchgd",
                         model={"init_backbone": str(Path(low["run_dir"]) / BEST_CHECKPOINT)}) if low["fits"] else
                not_fitting("patchgd init low-res gd", args.image_size, "no low-resolution GD backbone")]

    wall = time.perf_counter() - started
    headers, rows = table(records)
    print(format_table(headers, rows))
    print(f"total wall time {wall:.0f} s")
    results = {"task": args.task, "pretrain_cells_epochs": args.pretrain_cells, "backbone_lr": args.backbone_lr,
               "budget_bytes": budget, "gd_full_res_peak_bytes_by_batch": peaks, "max_scale":
               default_max_scale(args.image_size) if args.task == "ultramnist" else None, "low_res_sides_tried": tried, "runs": records,
               "paper_4gb_accuracy_percent": PAPER_4GB, "wall_s": round(wall, 1)}
    write_json(args, "study", torch.device("cpu"), results)
    report = out / "study.md"
    with atomic_file(report) as tmp:
        start = (f"every arm from a backbone pretrained {args.pretrain_cells} epoch(s) on cells"
                 if args.pretrain_cells else "random initialisation")
        tmp.write_text(f"# {TASKS[args.task]} study, {args.image_size} px, seed {args.seed}\n\n{start}; budget {format_size(budget)} "
                       f"(GD full-resolution peak: batch 1 {format_size(peaks[1])}, batch 2 "
                       f"{format_size(peaks[2])}); {machine(torch.device('cpu'))}\n\n{markdown(headers, rows)}\n\n"
                       f"total wall time {wall:.0f} s\n")
    png = out / "study_curves.png"
    plot(records, budget, args.image_size, TASKS[args.task], png)
    print(f"wrote {report} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
