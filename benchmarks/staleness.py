"""Why a cached fill trains another model than the exact one: how far a cached run's stored codes are, at its
end, from the codes its final encoder gives, and what its head makes of each.

For each run directory of ``patchgd.fill: cached`` with its store in memory (``last.pt`` and the store's
snapshot ``zstore-E.pt`` beside it), on the run's training images:

* per cell, the relative distance ``|z_stored - z_now| / |z_now|`` of the stored code from the one the
  final encoder gives now (evaluation's fill, eval mode), by the code's age in steps when the run ended;
* the head's accuracy and loss on the stored ``Z`` (what training last showed it) and on the fresh ``Z``
  (what evaluation gives it, for the images it trained on);
* where the run started from a backbone (``model.init_backbone``), what moved the codes: the distance of
  the final encoder's codes from those of the final encoder with its BatchNorm running statistics put back
  to the start's, and with its other weights put back (the statistics follow the batches of sampled cells
  whatever the learning rate).

Usage: python -m benchmarks.staleness RUN_DIR [RUN_DIR ...] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from patchgd.checkpoint import load_checkpoint
from patchgd.data.datasets import collate_images
from patchgd.engine.build import encoder_of, init_backbone
from patchgd.engine.data import build_datasets
from patchgd.engine.zcache import SNAPSHOT, store_layout
from patchgd.inference import load_model
from patchgd.io import atomic_file
from patchgd.zstore import ZStore

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
AGES = (0, 50, 100, 200, 400)  # bins of a code's age in steps: [0, 50), [50, 100), ..., [400, ...)


def put_back(model: torch.nn.Module, init: str) -> dict[str, torch.nn.Module]:
    """The final ``model`` with its encoder's BatchNorm running statistics from the backbone the run started
    from (``init``), and with its encoder's other weights from there: what each part alone moved."""
    start = copy.deepcopy(model)
    init_backbone(start, init)
    then, now = encoder_of(start).state_dict(), encoder_of(model).state_dict()
    hybrids = {}
    for part, from_start in (("statistics", True), ("weights", False)):
        hybrid = copy.deepcopy(model)
        encoder_of(hybrid).load_state_dict(
            {k: (then if (k.rsplit(".", 1)[-1] in STATISTICS) == from_start else now)[k] for k in now})
        hybrids[part] = hybrid
    return hybrids


def relative(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per cell of ``(B, s, m, n)`` grids, ``|a - b| / |b|``."""
    a, b = a.flatten(2), b.flatten(2)
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).flatten().numpy()


def measure(run_dir: Path) -> dict:
    state = load_checkpoint(run_dir / "last.pt")
    model, cfg = load_model(run_dir / "last.pt")
    if cfg.patchgd.fill != "cached" or cfg.patchgd.store != "memory":
        raise ValueError(f"{run_dir}: patchgd.fill={cfg.patchgd.fill}, store={cfg.patchgd.store}; expected a "
                         "cached run with its store in memory")
    train_set, _ = build_datasets(cfg)
    cells, width, features = store_layout(cfg, model, train_set)
    if features:
        raise ValueError(f"{run_dir}: its store holds a frozen encoder's features, which never go stale")
    store = ZStore.create(cells, width, cfg.patchgd.store_dtype)
    store.load_state_dict(load_checkpoint(run_dir / SNAPSHOT.format(epoch=state["epoch"])))
    now = int(max(store.stamps(i).max() for i in range(len(cells))))
    hybrids = put_back(model, cfg.model.init_backbone) if cfg.model.init_backbone else {}
    moved = {part: [] for part in hybrids}
    distances, ages, rows = [], [], {"stored": [], "fresh": []}
    labels_all = []
    loader = DataLoader(train_set, batch_size=16, collate_fn=collate_images)
    first = 0
    with torch.inference_mode():
        for images, labels in loader:
            fresh = model.fill_z(images)  # (B, s, m, n), eval mode: what evaluation computes
            b, s, m, n = fresh.shape
            stored = torch.stack([store.read(first + i).T.reshape(s, m, n) for i in range(b)])
            distances.append(relative(stored, fresh))
            for part, hybrid in hybrids.items():
                moved[part].append(relative(hybrid.fill_z(images), fresh))
            ages.append(np.concatenate([now - store.stamps(first + i) for i in range(b)]))
            rows["stored"].append(model.classify(stored))
            rows["fresh"].append(model.classify(fresh))
            labels_all.append(labels)
            first += b
    labels = torch.cat(labels_all)
    distance, age = np.concatenate(distances), np.concatenate(ages)
    bins = []
    for low, high in zip(AGES, [*AGES[1:], None]):
        inside = (age >= low) & (age < high if high is not None else True)
        if inside.any():
            bins.append({"age": f"{low}-{high - 1}" if high else f"{low}+", "cells": int(inside.sum()),
                         "median_distance": float(np.median(distance[inside]))})
    heads = {}
    for name, logits in rows.items():
        logits = torch.cat(logits)
        heads[name] = {"accuracy": float((logits.argmax(1) == labels).float().mean()),
                       "loss": float(F.cross_entropy(logits.float(), labels))}
    return {"run": str(run_dir), "epoch": state["epoch"], "steps": now, "images": len(cells),
            "cells": int(distance.size), "median_distance": float(np.median(distance)),
            "mean_age": float(age.mean()), "by_age": bins, "head_on": heads,
            "moved_by": {part: float(np.median(np.concatenate(d))) for part, d in moved.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.staleness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of cached runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(run) for run in args.runs]
    for r in results:
        heads = r["head_on"]
        print(f"{r['run']}: epoch {r['epoch']}, {r['steps']} steps, {r['cells']} cells of {r['images']} training "
              f"images; stored vs now: median relative distance {r['median_distance']:.3f}, mean age "
              f"{r['mean_age']:.0f} steps")
        print("  by age: " + "; ".join(f"{b['age']} steps: {b['median_distance']:.3f} ({b['cells']} cells)"
                                       for b in r["by_age"]))
        print(f"  head on the stored Z: accuracy {heads['stored']['accuracy']:.3f}, loss {heads['stored']['loss']:.3f}"
              f"; on the fresh Z: accuracy {heads['fresh']['accuracy']:.3f}, loss {heads['fresh']['loss']:.3f}")
        if r["moved_by"]:
            print("  codes now against the same encoder with, from the start, its "
                  + "; ".join(f"{part}: median {d:.3f}" for part, d in r["moved_by"].items()))
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
