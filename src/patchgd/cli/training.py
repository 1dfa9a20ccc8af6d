"""``patchgd train``, ``plan``, ``sweep`` and ``demo``: runs from a config."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ..config import ConfigError, check_paths, find_config, load_config, packaged_configs
from .common import add_config_options, config_from_args
from ..rundir import CONFIG_FILE


def cmd_train(args) -> int:
    if args.resume:
        # The resumed run's config: --config, or the run's own config.yaml, with --set on top; fit()
        # refuses it if it differs from the checkpoint's in anything but a larger train.epochs.
        saved = Path(args.resume) / CONFIG_FILE
        if args.config is None and not saved.is_file():
            raise FileNotFoundError(f"{saved} not found: --resume expects a run directory made by patchgd train")
        cfg = load_config(args.config or saved, args.set)
    else:
        if args.config is None:
            raise ConfigError("patchgd train needs --config FILE.yaml (or --resume RUN_DIR)")
        cfg = config_from_args(args)
        check_paths(cfg)  # torch and timm take seconds to load: a wrong path is reported before them
    from .. import distributed
    from ..engine.trainer import fit

    with distributed.process_group(cfg.train.device):  # joins torchrun's group; nothing when run alone
        summary = fit(cfg, resume=args.resume)
        if distributed.is_main():
            print(f"best val accuracy {summary['best_accuracy']:.4f}; run directory {summary['run_dir']}")
    return 0


def cmd_plan(args) -> int:
    cfg = config_from_args(args)  # a config error comes before torch (seconds)
    from ..engine.build import resolve_device
    from ..engine.plan import plan_from_config

    if args.budget:
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, budget=args.budget))
    if cfg.memory.budget is None:
        raise ConfigError("no memory budget: give --budget 4GB or set memory.budget in the config")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - progress, apart from the plan
    print(plan_from_config(cfg, resolve_device(cfg.train.device), args.processes, log=log).describe())
    return 0


def cmd_sweep(args) -> int:
    from ..sweep import run_sweep

    out = args.out or str(Path("runs") / Path(args.spec).stem)
    rows = run_sweep(args.spec, out, devices=args.devices, slots=args.slots,
                     log=lambda line: print(line, flush=True))
    print((Path(out) / "results.md").read_text(), end="")
    return 0 if all(r["status"] == "done" for r in rows) else 1


def cmd_cv(args) -> int:
    from ..cv import run_cv

    out = args.out or str(Path("runs") / f"cv-{Path(args.config).stem}")
    report = run_cv(args.config, out, overrides=args.set, devices=args.devices, slots=args.slots,
                    log=lambda line: print(line, flush=True))
    print((Path(out) / "cv.md").read_text(), end="")
    return 0 if all(f["status"] == "done" for f in report["folds"]) else 1


def cmd_demo(args) -> int:
    from ..cells import pretrain_on_cells
    from ..data.prepare.digits import load_digits_source
    from ..data.prepare.megapixel_mnist import PRESETS, generate_megapixel_mnist
    from ..memory import format_size
    from ..engine.trainer import fit

    cfg = load_config("demo", args.set)
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


def describe_recipe(path: Path) -> str:
    """A recipe's first comment line: what it trains."""
    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "# ")
    text = first.lstrip("# ").strip()
    return text if text.endswith(".") else f"{text} ..."


def cmd_configs(args) -> int:
    recipes = packaged_configs()
    if args.name is None:
        width = max(map(len, recipes))
        for name, path in recipes.items():
            print(f"{name:<{width}}  {describe_recipe(path)}")
        print("\nuse one by name (patchgd train --config slides), or copy one to edit: "
              "patchgd configs show NAME > my.yaml")
        return 0
    print(find_config(args.name).read_text(encoding="utf-8"), end="")
    return 0


def register(sub) -> None:
    """Add ``train``, ``plan``, ``sweep``, ``cv``, ``demo`` and ``configs`` to the ``patchgd`` command's
    subparsers ``sub``."""
    configs = sub.add_parser("configs", help="list the packaged recipes; 'configs show NAME' prints one to copy")
    configs.add_argument("show", nargs="?", choices=["show"], help="print the recipe NAME")
    configs.add_argument("name", nargs="?", help="a recipe's name, e.g. slides")
    configs.set_defaults(func=cmd_configs)

    train = sub.add_parser("train", help="train a model from a YAML config")
    add_config_options(train, required=False)
    train.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue the run in RUN_DIR at its next epoch, with its config.yaml (or --config) and --set; a "
        "config that differs from the checkpoint's is refused, except a larger train.epochs"))
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="fit a run into a memory budget and show the plan")
    add_config_options(plan)
    plan.add_argument("--budget", help="memory budget, e.g. 4GB (default: memory.budget of the config)")
    plan.add_argument("--processes", type=int, default=1, metavar="N",
                      help="data-parallel processes (torchrun --nproc_per_node x nodes) the run will use; the "
                           "budget and batch are per process, the global batch N times it (default 1)")
    plan.set_defaults(func=cmd_plan)

    sweep = sub.add_parser("sweep", help="run a grid of config overrides, queued over devices, with a results "
                           "table (resumable)")
    sweep.add_argument("spec", help="sweep spec (YAML, or a packaged one's name such as "
                       "sweeps/panda_sampling_ablation): base config, set, grid and/or points")
    sweep.add_argument("--out", help="sweep folder (default runs/<spec name>): runs/, logs/, status/, results.csv/.md")
    sweep.add_argument("--devices", nargs="+", metavar="DEVICE",
                       help="cuda:0 cuda:1 ... (one run per GPU at a time) or cpu (default: every GPU, else cpu)")
    sweep.add_argument("--slots", type=int, default=1,
                       help="runs side by side on the CPU, its threads split between them (default 1)")
    sweep.set_defaults(func=cmd_sweep)

    cv = sub.add_parser("cv", help="cross-validation: train every fold of the CSV's kfold column (resumable), then "
                        "per-fold, mean ± std and pooled out-of-fold metrics with intervals (cv.md)")
    add_config_options(cv)
    cv.add_argument("--out", help="folder (default runs/cv-<config name>): runs/, logs/, status/, cv.csv, cv.md, "
                    "cv.json, cv_roc.png")
    cv.add_argument("--devices", nargs="+", metavar="DEVICE",
                    help="cuda:0 cuda:1 ... (one fold per GPU at a time) or cpu (default: every GPU, else cpu)")
    cv.add_argument("--slots", type=int, default=1, help="folds side by side on the CPU (default 1)")
    cv.set_defaults(func=cmd_cv)

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
                      help="override a key of the demo config (patchgd configs show demo)")
    demo.set_defaults(func=cmd_demo)
