"""The paper's UltraMNIST finding at CPU scale: GD, GD-extended and PatchGD under the same memory budget.

Generates UltraMNIST from real MNIST digits (train and validation images draw their digits from disjoint
pools), then trains every method with :func:`patchgd.engine.trainer.fit` under a loose and a tight memory budget
(``memory.budget``: the planner gives each method the largest batch that fits), with the same backbone,
epochs and schedule. Reports best and final validation accuracy, QWK, peak memory, the batch size the
budget allowed and wall time; then PatchGD ablations at the tight budget (sampling with max-sampled,
Table 4 of the paper; accumulation steps ε, Tables 5-6) and PatchGD initialised from the GD backbone
(App. C). Writes ``ultramnist.json``, ``ultramnist.md`` and ``ultramnist_curves.png`` to ``--out``.

``--budgets auto`` scales the paper's 16 GB / 4 GB pair to this machine: the loose budget is GD's measured
step peak at ``--loose-batch`` images, the tight one a quarter of it.
"""

from __future__ import annotations

import argparse
import sys
import csv
import dataclasses
import shutil
import time
import warnings
from pathlib import Path

import torch

from patchgd.config import Config, DataConfig, MemoryConfig, ModelConfig, PatchGDConfig, TrainConfig
from patchgd.data.prepare.ultramnist import generate_ultramnist
from patchgd.io import atomic_file
from patchgd.memory import format_size, parse_size
from patchgd.engine.plan import plan_budget
from patchgd.engine.trainer import fit
from ._common import SHARED_MNIST, main_of, format_table, machine, write_json
from patchgd.rundir import BEST_CHECKPOINT, METRICS_FILE

METHODS = ("gd", "gd-extended", "patchgd")
TIGHT_RATIO = 4  # 16 GB : 4 GB
# The paper's Table 1 (UltraMNIST 512 px, 4 GB), for the report.
PAPER_4GB = {"resnet50": {"gd": 53.6, "gd-extended": 52.5, "patchgd": 63.1},
             "mobilenetv2": {"gd": 67.7, "gd-extended": 60.0, "patchgd": 74.8}}
QUICK = dict(train=20, val=10, image_size=64, epochs=1, budgets=["64MB", "16MB"], max_batch=4)


def register(subparsers) -> None:
    """Add the ``ultramnist`` subcommand."""
    parser = subparsers.add_parser("ultramnist", help="GD vs GD-extended vs PatchGD on UltraMNIST at two "
                                   "memory budgets, with PatchGD ablations", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default=str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None,
                        help="MNIST folder of IDX files (default: the shared MNIST beside this repo if present, "
                             "else scikit-learn's bundled digits, with a warning)")
    parser.add_argument("--out", default="bench-results/ultramnist", help="output folder (data, runs, report)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every run (default 5)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--max-scale", type=int, default=None,
                        help="largest digit scale (x 28 px); default scales 9 at 512 px down with the image")
    parser.add_argument("--train", type=int, default=800, help="training images (default 800)")
    parser.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    parser.add_argument("--backbone", default="test_resnet", help="timm backbone of all methods (default test_resnet)")
    parser.add_argument("--width", type=int, default=64,
                        help="latent size s and conv-head channels (default 64: the paper's 256 would outweigh "
                             "a tiny backbone in memory)")
    parser.add_argument("--grid", type=int, default=4, help="PatchGD patches per side: patch = image/grid (default 4, "
                        "as 128 px patches of 512 px images)")
    parser.add_argument("--budgets", nargs=2, default=["auto", "auto"], metavar=("LOOSE", "TIGHT"),
                        help="memory budgets such as 200MB 50MB; 'auto' derives them from GD's peaks (default)")
    parser.add_argument("--loose-batch", type=int, default=16,
                        help="with auto budgets, the GD batch the loose budget holds (default 16)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="largest batch size the planner considers for any method (default 16)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods compared at each budget (default all)")
    parser.add_argument("--ablations", choices=("on", "off"), default="on",
                        help="PatchGD ablations at the tight budget (default on)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, Adam (default 1e-3)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids thrashing on a busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (seconds), for tests: "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.set_defaults(func=run)


def base_config(args: argparse.Namespace, data_root: Path) -> Config:
    """What every run shares: data, backbone, schedule, seed; the method and budget are set per run."""
    return Config(
        model=ModelConfig(backbone=args.backbone, patch_size=args.image_size // args.grid, in_chans=1,
                          latent_dim=args.width, head_width=args.width, head=getattr(args, "head", "conv")),
        data=DataConfig(root=str(data_root), num_classes=10),
        train=TrainConfig(epochs=args.epochs, batch_size=args.max_batch, lr=args.lr,
                          warmup_epochs=args.warmup_epochs, seed=args.seed, device="cpu", eval_batch_size=32),
        patchgd=PatchGDConfig(sampling=0.25, max_sampled=1.0, grad_accum_steps=getattr(args, "grad_accum_steps", None)),
        memory=MemoryConfig())


def variant(cfg: Config, *, method: str | None = None, budget: int | None = None,
            output_dir: Path | None = None, **sections: dict) -> Config:
    """``cfg`` with some fields replaced; ``sections`` maps a section (``patchgd``, ``model``, ``train``,
    ``data``) to the fields replaced in it."""
    cfg = dataclasses.replace(cfg, method=method or cfg.method, output_dir=str(output_dir or cfg.output_dir))
    if budget is not None:
        cfg = dataclasses.replace(cfg, memory=MemoryConfig(budget=str(budget)))
    for section, fields in sections.items():
        if fields:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    return cfg


def gd_peaks(cfg: Config, image_shape: tuple[int, ...], max_batch: int) -> dict[int, int]:
    """GD's measured step peak at batch sizes 1, 2, 4, ... up to ``max_batch`` (the planner's own trials)."""
    plan = plan_budget(variant(cfg, method="gd", budget=2**50), image_shape, "cpu", max_batch_size=max_batch)
    return {t.batch_size: t.peak_bytes for t in plan.trials}


def choose_budgets(args: argparse.Namespace, peaks: dict[int, int]) -> tuple[int, int]:
    """The two budgets in bytes: given, or the GD peak at ``--loose-batch`` (+2 %) and a quarter of it."""
    loose, tight = args.budgets
    if loose == "auto":
        anchor = max(b for b in peaks if b <= args.loose_batch)
        loose_bytes = int(peaks[anchor] * 1.02)
    else:
        loose_bytes = parse_size(loose)
    return loose_bytes, loose_bytes // TIGHT_RATIO if tight == "auto" else parse_size(tight)


def train_run(cfg: Config, name: str, budget_name: str) -> dict:
    """Train one configuration with :func:`fit`; its summary, curve and the setting the budget allowed."""
    started = time.perf_counter()
    summary = fit(cfg)
    wall = time.perf_counter() - started
    used = summary["config"]
    rows = list(csv.DictReader((Path(summary["run_dir"]) / METRICS_FILE).open()))
    accuracy = [float(r["val_accuracy"]) for r in rows]
    qwk = [float(r["val_qwk"]) for r in rows]
    best = max(range(len(accuracy)), key=accuracy.__getitem__)
    record = {"name": name, "budget": budget_name, "method": cfg.method, "run_dir": summary["run_dir"],
              "batch_size": used.train.batch_size, "micro_batch_size": used.train.micro_batch_size,
              "image_size": used.data.image_size, "best_accuracy": accuracy[best], "best_epoch": best + 1,
              "final_accuracy": accuracy[-1], "best_qwk": qwk[best], "final_qwk": qwk[-1],
              "peak_memory_bytes": summary["peak_memory_bytes"], "wall_s": round(wall, 1),
              "val_accuracy_per_epoch": accuracy}
    if cfg.method == "patchgd":
        record.update(sampling=used.patchgd.sampling, max_sampled=used.patchgd.max_sampled,
                      grad_accum_steps=used.patchgd.grad_accum_steps, init_backbone=used.model.init_backbone)
    print(f"== {budget_name} {name}: batch {record['batch_size']}, best acc {record['best_accuracy']:.4f}, "
          f"final acc {record['final_accuracy']:.4f}, final qwk {record['final_qwk']:.4f}, "
          f"peak {format_size(record['peak_memory_bytes'])}, {record['wall_s']} s", flush=True)
    return record


def ablation_settings(main: dict) -> list[tuple[str, dict, dict]]:
    """PatchGD variants at the tight budget: (name, patchgd overrides, model overrides)."""
    return [("patchgd s=0.5 max=1", {"sampling": 0.5}, {}),
            ("patchgd s=0.25 max=0.5", {"max_sampled": 0.5}, {}),
            ("patchgd eps=1", {"grad_accum_steps": 1}, {}),
            ("patchgd init from gd", {}, {"init_backbone": str(Path(main["run_dir"]) / BEST_CHECKPOINT)})]


def table(records: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["budget", "run", "batch", "peak", "best acc", "final acc", "best qwk", "final qwk", "wall s"]
    rows = [[r["budget"], r["name"], r["batch_size"], format_size(r["peak_memory_bytes"]),
             f"{r['best_accuracy']:.4f}", f"{r['final_accuracy']:.4f}", f"{r['best_qwk']:.4f}",
             f"{r['final_qwk']:.4f}", r["wall_s"]] for r in records]
    return headers, rows


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def plot(records: list[dict], budgets: dict[str, int], png: Path) -> None:
    """Validation accuracy per epoch of the compared methods, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.8), sharey=True, squeeze=False)
    for ax, (budget, size) in zip(axes[0], budgets.items()):
        for r in records:
            if r["budget"] == budget:
                curve = r["val_accuracy_per_epoch"]
                ax.plot(range(1, len(curve) + 1), curve, "o-", label=f"{r['name']} (batch {r['batch_size']})")
        ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
        ax.set(title=f"{budget} budget ({format_size(size)})", xlabel="epoch", ylabel="val accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def prepare(args: argparse.Namespace, quick: dict, generate=None) -> Path:
    """What an UltraMNIST benchmark does first: apply ``--quick`` (``quick``) and ``--threads``, drop the
    runs of an earlier call, generate the data set (UltraMNIST, or ``generate(folder)``); its root."""
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.digits is None:
        warnings.warn("no MNIST folder found (--digits): using scikit-learn's bundled digits, which are not "
                      "the paper's MNIST", stacklevel=1)
    out = Path(args.out)
    shutil.rmtree(out / "runs", ignore_errors=True)  # a rerun replaces this benchmark's own runs
    if generate is not None:
        return generate(out / "data")
    return generate_ultramnist(out / "data", train=args.train, val=args.val, image_size=args.image_size,
                               digits=args.digits, seed=args.seed, max_scale=getattr(args, "max_scale", None),
                               overwrite=True, progress=False)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    data_root = prepare(args, QUICK)
    out = Path(args.out)
    cfg = base_config(args, data_root)
    image_shape = (1, args.image_size, args.image_size)
    peaks = gd_peaks(cfg, image_shape, args.max_batch)
    print("GD step peak by batch size: " + ", ".join(f"{b}: {format_size(p)}" for b, p in peaks.items()))
    loose, tight = choose_budgets(args, peaks)
    budgets = {"loose": loose, "tight": tight}
    print(f"budgets: loose {format_size(loose)}, tight {format_size(tight)}", flush=True)

    records = []
    for budget_name, size in budgets.items():
        for method in args.methods:
            run_cfg = variant(cfg, method=method, budget=size, output_dir=out / "runs" / budget_name / method)
            records.append(train_run(run_cfg, method, budget_name))
    ablations = []
    if args.ablations == "on":
        by_name = {(r["budget"], r["name"]): r for r in records}
        gd_tight = by_name.get(("tight", "gd"))
        for name, patchgd, model in ablation_settings(gd_tight or {"run_dir": ""}):
            if model.get("init_backbone") and gd_tight is None:
                continue
            run_dir = out / "runs" / "tight" / name.replace(" ", "_").replace("=", "")
            run_cfg = variant(cfg, method="patchgd", budget=tight, output_dir=run_dir, patchgd=patchgd, model=model)
            ablations.append(train_run(run_cfg, name, "tight"))

    wall = time.perf_counter() - started
    headers, rows = table(records + ablations)
    print(format_table(headers, rows))
    print(f"total wall time {wall:.0f} s")
    results = {"budgets_bytes": budgets, "gd_peak_bytes_by_batch": peaks, "runs": records, "ablations": ablations,
               "paper_4gb_accuracy_percent": PAPER_4GB, "wall_s": round(wall, 1)}
    write_json(args, "ultramnist", torch.device("cpu"), results)
    report = out / "ultramnist.md"
    with atomic_file(report) as tmp:
        tmp.write_text(f"# UltraMNIST, seed {args.seed}\n\nbudgets: loose {format_size(loose)}, tight "
                       f"{format_size(tight)}; {machine(torch.device('cpu'))}\n\n{markdown(headers, rows)}\n\n"
                       f"total wall time {wall:.0f} s\n")
    png = out / "ultramnist_curves.png"
    plot(records, budgets, png)
    print(f"wrote {report} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
