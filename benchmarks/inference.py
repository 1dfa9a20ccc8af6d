"""Inference images/s and peak memory: GD, PatchGD, and the fill loop of the paper's code (Table 3 analogue).

All arms run in eval mode under ``torch.inference_mode``. GD is the backbone on the whole image. PatchGD
fills ``Z`` with its default chunk (one grid row of every image per backbone call) and applies its head;
``patchgd-64`` is the same model with the earlier default of 64 patches per call. ``reference`` is the
loop of the paper's code (``patch_gd/train_utils.py``, ``val_step``): chunks of ``ceil(sampling * m * n)``
cell positions, each cut from every image of the batch by slicing, encoded, written into ``Z``, then the
head - the same model, so only the fill's chunking and cutting differ.
"""

from __future__ import annotations

import argparse
import sys
import functools
import math

import torch

from patchgd.memory import PeakMemory
from ._common import (main_of, add_common_arguments, autocast, build_model, format_table, interleaved, median,
                      resolve_device, write_json)


def register(subparsers) -> None:
    """Add the ``inference`` subcommand."""
    parser = subparsers.add_parser("inference", help="inference images/s and memory of GD, PatchGD and the "
                                   "paper's fill loop", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[512, 1024], repeats=5)
    parser.add_argument("--sampling", type=float, default=0.25,
                        help="the reference loop's fraction of cells per backbone call (default 0.25)")
    parser.set_defaults(func=run)


def reference_logits(model, images: torch.Tensor, sampling: float) -> torch.Tensor:
    """The paper's inference: ``Z`` filled ``ceil(sampling * m * n)`` cell positions at a time."""
    batch, _, height, width = images.shape
    p = model.patch_size
    rows, cols = height // p, width // p
    z = torch.zeros(batch, model.latent_dim, rows, cols, device=images.device)
    per_call = math.ceil(sampling * rows * cols)
    for start in range(0, rows * cols, per_call):
        positions = range(start, min(start + per_call, rows * cols))
        patches = torch.stack([images[:, :, (i // cols) * p:(i // cols + 1) * p, (i % cols) * p:(i % cols + 1) * p]
                               for i in positions], dim=1).flatten(0, 1)
        out = model.encode(patches).view(batch, len(positions), -1).permute(0, 2, 1)
        for j, i in enumerate(positions):
            z[:, :, i // cols, i % cols] = out[:, :, j]
    return model.head(z)


def run(args: argparse.Namespace) -> int:
    """Measure every arm at each image size, print the table and write ``inference.json``."""
    device = resolve_device(args)
    gd = build_model("gd", args, device).eval()
    patchgd = build_model("patchgd", args, device).eval()
    patchgd_64 = build_model("patchgd", args, device).eval()
    patchgd_64.fill_batch_size = 64
    arms = {"gd": gd, "patchgd": patchgd, "patchgd-64": patchgd_64,
            "reference": functools.partial(reference_logits, patchgd, sampling=args.sampling)}
    models = {**arms, "reference": patchgd}  # what each arm holds, the baseline of its peak memory
    results = []
    for size in args.image_sizes:
        if size % args.patch_size:
            raise ValueError(f"--image-sizes {size} is not a multiple of --patch-size {args.patch_size}; the "
                             "reference loop, like the paper's code, needs whole patches")
        torch.manual_seed(args.seed)
        images = torch.randn(args.batch_size, 3, size, size, device=device)

        def predict(arm):
            with torch.inference_mode(), autocast(device, args.amp):
                return arm(images)

        calls = {name: functools.partial(predict, arm) for name, arm in arms.items()}
        samples = interleaved(calls, args.repeats, args.warmup, device)
        peaks = {}
        for name, call in calls.items():
            with PeakMemory(device, baseline=(models[name], images)) as meter:
                call()
            peaks[name] = meter.peak_bytes
        seconds = {name: [s for s, _ in pairs] for name, pairs in samples.items()}
        row = {"image_size": size, "samples_s": seconds, "peak_bytes": peaks}
        for name in arms:
            row[f"{name}_s"] = median(seconds[name])
            row[f"{name}_images_per_s"] = args.batch_size / row[f"{name}_s"]
        row["max_logit_difference_to_reference"] = (predict(patchgd) - predict(arms["reference"])).abs().max().item()
        row["ratio_patchgd_to_gd"] = row["gd_s"] / row["patchgd_s"]
        row["speed_patchgd_to_reference"] = row["reference_s"] / row["patchgd_s"]
        row["memory_patchgd_to_reference"] = peaks["patchgd"] / peaks["reference"]
        results.append(row)
    print(f"inference: {args.backbone}, {args.patch_size} px patches, batch {args.batch_size}, {device}, median of "
          f"{args.repeats}; reference = the paper's fill loop at sampling {args.sampling}")
    print(format_table(["image px", "GD img/s", "PatchGD img/s", "PatchGD-64 img/s", "reference img/s",
                        "PatchGD/GD", "PatchGD/ref speed", "PatchGD/ref memory", "PatchGD-64/ref memory"],
                       [[r["image_size"], r["gd_images_per_s"], r["patchgd_images_per_s"],
                         r["patchgd-64_images_per_s"], r["reference_images_per_s"], r["ratio_patchgd_to_gd"],
                         r["speed_patchgd_to_reference"], r["memory_patchgd_to_reference"],
                         r["peak_bytes"]["patchgd-64"] / r["peak_bytes"]["reference"]] for r in results]))
    write_json(args, "inference", device, {"sizes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
