"""Inference throughput in images/s, GD against PatchGD (the analogue of Table 3 of the paper).

Both models run in eval mode under ``torch.inference_mode``: GD is the backbone on the whole image,
PatchGD fills ``Z`` patch by patch (in chunks of ``--fill-batch-size``) and applies its head.
"""

from __future__ import annotations

import argparse
import functools

import torch

from ._common import (add_common_arguments, autocast, build_model, format_table, interleaved, median,
                      resolve_device, write_json)


def register(subparsers) -> None:
    """Add the ``inference`` subcommand."""
    parser = subparsers.add_parser("inference", help="inference images/s of GD and PatchGD", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[512, 2048], repeats=3)
    parser.add_argument("--fill-batch-size", type=int, default=64,
                        help="PatchGD patches per backbone call (default 64)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure both methods at each image size, print the table and write ``inference.json``."""
    device = resolve_device(args)
    models = {method: build_model(method, args, device).eval() for method in ("gd", "patchgd")}
    models["patchgd"].fill_batch_size = args.fill_batch_size
    results = []
    for size in args.image_sizes:
        torch.manual_seed(args.seed)
        images = torch.randn(args.batch_size, 3, size, size, device=device)

        def predict(model):
            with torch.inference_mode(), autocast(device, args.amp):
                return model(images)

        samples = interleaved({name: functools.partial(predict, model) for name, model in models.items()},
                              args.repeats, args.warmup, device)
        seconds = {name: [s for s, _ in pairs] for name, pairs in samples.items()}
        gd_s, patchgd_s = median(seconds["gd"]), median(seconds["patchgd"])
        results.append({"image_size": size, "gd_s": gd_s, "patchgd_s": patchgd_s,
                        "gd_images_per_s": args.batch_size / gd_s,
                        "patchgd_images_per_s": args.batch_size / patchgd_s,
                        "ratio_patchgd_to_gd": gd_s / patchgd_s, "samples_s": seconds})
    print(f"inference: {args.backbone}, PatchGD {args.patch_size} px patches in chunks of {args.fill_batch_size}, "
          f"batch {args.batch_size}, {device}, median of {args.repeats}")
    print(format_table(["image px", "GD img/s", "PatchGD img/s", "PatchGD/GD"],
                       [[r["image_size"], r["gd_images_per_s"], r["patchgd_images_per_s"],
                         r["ratio_patchgd_to_gd"]] for r in results]))
    write_json(args, "inference", device, {"sizes": results})
    return 0
