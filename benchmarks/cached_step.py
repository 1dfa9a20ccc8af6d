"""The training step's time with a cached fill against Algorithm 1's, interleaved, on one batch.

The demo's model (test_resnet, 64 px patches, latent 64, attention head, fill in eval mode, ε = 1) on a
batch of ``--batch`` Megapixel-MNIST-like images of ``--image-size`` px (random pixels: timing does not
depend on them). Arms, each a step on the same batch, alternated ``--repeats`` times after a warm-up, medians:

* ``exact``: Algorithm 1: the fill, then ζ inner iterations of k cells;
* ``cached``: ``patchgd.fill: cached`` after the images' first visit: Z read from the store, the same inner
  iterations, their codes written back;
* ``cached+refresh``: the same with ``refresh`` N/8 cells per image re-encoded;
* ``two-stage``: ``model.freeze: all`` with a cached fill: the stored features projected.

Also the cost of one encode without gradients and with (forward and backward), per patch, from chunks of
``B * k`` patches. One torch thread by default.

Usage: python -m benchmarks.cached_step --image-size 1024 --max-sampled 0.25 [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import patchgd
from patchgd.config import load_config
from patchgd.engine.build import build_model
from patchgd.methods import patches_per_iteration
from patchgd.methods.cached import CachedZ
from patchgd.zstore import ZStore


def model(freeze=None) -> patchgd.PatchGDClassifier:
    """The demo recipe's model (``configs/demo.yaml``), its weights seeded, its encoder frozen or not."""
    torch.manual_seed(0)
    return build_model(load_config("demo", [f"model.freeze={freeze or 'null'}"]), weights=False)


def stepper(kind: str, args, cells: int):
    net = model("all" if kind == "two-stage" else None)
    cache = None
    if kind != "exact":
        features = kind == "two-stage"
        width = net.feature_dim if features else net.latent_dim
        cache = CachedZ(net, ZStore.create([cells] * args.batch, width), features=features,
                        refresh=cells // 8 if kind == "cached+refresh" else 0)
    params = [p for p in net.parameters() if p.requires_grad]
    step = patchgd.PatchGD(net, torch.optim.Adam(params, lr=1e-4), sampling=args.sampling, max_sampled=args.max_sampled,
                           grad_accum_steps=1, fill_mode="eval", cache=cache,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.batch) % 10
    if cache is not None:
        labels = torch.stack([labels, torch.arange(args.batch)], dim=1)
    return step, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sampling", type=float, default=0.25, help="k = sampling x cells (default 0.25)")
    parser.add_argument("--max-sampled", type=float, default=0.25, help="ζ = max_sampled / sampling (default 0.25)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    patch = load_config("demo").model.patch_size
    cells = (args.image_size // patch) ** 2
    images = torch.randint(0, 255, (args.batch, 1, args.image_size, args.image_size), dtype=torch.uint8)
    arms = {kind: stepper(kind, args, cells) for kind in ("exact", "cached", "cached+refresh", "two-stage")}
    for step, labels in arms.values():  # warm-up; for the cached arms, the images' first visit
        step.step(images, labels)
    times = {kind: [] for kind in arms}
    for _ in range(args.repeats):
        for kind, (step, labels) in arms.items():
            started = time.perf_counter()
            step.step(images, labels)
            times[kind].append(time.perf_counter() - started)
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    # the encoder's cost per patch, without gradients and with (forward and backward), in chunks of B * k
    net = model()
    k = patches_per_iteration(args.sampling, cells)
    patches = torch.randint(0, 255, (args.batch * k, 1, patch, patch), dtype=torch.uint8)
    encode = {"no_grad": [], "with_grad": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        with torch.no_grad():
            net.encode(patches)
        encode["no_grad"].append(time.perf_counter() - started)
        started = time.perf_counter()
        net.encode(patches).sum().backward()
        encode["with_grad"].append(time.perf_counter() - started)
    per_patch = {kind: statistics.median(t) / len(patches) for kind, t in encode.items()}
    print(f"{args.image_size} px ({cells} cells), batch {args.batch}, k {k}, sampling {args.sampling}, "
          f"max_sampled {args.max_sampled}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved steps after a warm-up:")
    for kind, median in medians.items():
        print(f"  {kind:>15}: {median:7.3f} s per step, {median / medians['exact']:.3f} x exact")
    print(f"  encode per patch: {per_patch['no_grad'] * 1e3:.3f} ms without gradients, "
          f"{per_patch['with_grad'] * 1e3:.3f} ms with (forward and backward): {per_patch['with_grad'] / per_patch['no_grad']:.2f} x")
    print(json.dumps({"args": vars(args), "step_s": times, "median_step_s": medians, "encode_s_per_patch": per_patch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
