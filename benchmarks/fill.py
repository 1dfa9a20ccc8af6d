"""Fill throughput: ``PatchGDClassifier.fill_z`` against its backbone alone on pre-cut patches; and the cost
of cutting the patches out: a gather of every cell (``PatchGrid.patches``) against whole grid rows
(``PatchGrid.patch_range``, what the fill uses).

Both sides run the same backbone module under ``no_grad`` in the same chunks. The reference gets every
patch already cut into one contiguous ``(N, C, p, p)`` tensor, so the ratio
``fill_z patches/s / backbone patches/s`` is what the fill costs beyond the backbone itself: cutting the
patches out of the image and writing the features into ``Z``. Target: at least 0.95.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ._common import (main_of, add_common_arguments, autocast, build_model, format_table, interleaved, median,
                      resolve_device, write_json)

TARGET = 0.95


def register(subparsers) -> None:
    """Add the ``fill`` subcommand."""
    parser = subparsers.add_parser("fill", help="fill_z throughput against the bare backbone (target >= 0.95)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[512, 2048])
    parser.add_argument("--fill-batch-size", type=int, default=64,
                        help="patches per backbone call, on both sides (default 64)")
    parser.set_defaults(func=run)


def measure(args: argparse.Namespace, model, size: int, device: torch.device) -> dict:
    """Time ``fill_z`` and the bare backbone on one ``size`` x ``size`` batch."""
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    grid = model.grid(images)
    all_cells = torch.arange(grid.num_cells, device=device).expand(grid.batch_size, -1)
    memory_format = torch.channels_last if model.channels_last else torch.contiguous_format
    cut = grid.patches(all_cells).contiguous(memory_format=memory_format)
    chunks = cut.split(args.fill_batch_size)

    def fill_z():
        with autocast(device, args.amp):
            return model.fill_z(images, args.fill_batch_size)

    def backbone():
        with torch.no_grad(), autocast(device, args.amp):
            for chunk in chunks:
                model.backbone(chunk)

    samples = interleaved({"fill_z": fill_z, "backbone": backbone, "cut_gather": lambda: grid.patches(all_cells),
                           "cut_rows": lambda: grid.patch_range(0, cut.shape[0])},
                          args.repeats, args.warmup, device)
    seconds = {name: [s for s, _ in pairs] for name, pairs in samples.items()}
    patches = cut.shape[0]
    fill_s, backbone_s = median(seconds["fill_z"]), median(seconds["backbone"])
    gather_s, rows_s = median(seconds["cut_gather"]), median(seconds["cut_rows"])
    return {"image_size": size, "patches": patches, "fill_z_s": fill_s, "backbone_s": backbone_s,
            "fill_z_patches_per_s": patches / fill_s, "backbone_patches_per_s": patches / backbone_s,
            "ratio": backbone_s / fill_s, "cut_gather_s": gather_s, "cut_rows_s": rows_s,
            "cut_speedup": gather_s / rows_s, "samples_s": seconds}


def run(args: argparse.Namespace) -> int:
    """Measure every image size, print the table and write ``fill.json``."""
    device = resolve_device(args)
    model = build_model("patchgd", args, device).eval()
    rows = [measure(args, model, size, device) for size in args.image_sizes]
    print(f"fill_z vs bare backbone: {args.backbone}, {args.patch_size} px patches, batch {args.batch_size}, "
          f"chunks of {args.fill_batch_size}, {device}, median of {args.repeats}")
    print(format_table(["image px", "patches", "fill_z patch/s", "backbone patch/s", "ratio", "target",
                        "cut: gather ms", "cut: rows ms", "rows speed-up"],
                       [[r["image_size"], r["patches"], r["fill_z_patches_per_s"], r["backbone_patches_per_s"],
                         r["ratio"], f">= {TARGET}", 1e3 * r["cut_gather_s"], 1e3 * r["cut_rows_s"],
                         r["cut_speedup"]] for r in rows]))
    worst = min(r["ratio"] for r in rows)
    write_json(args, "fill", device, {"target_ratio": TARGET, "worst_ratio": worst, "met": worst >= TARGET,
                                      "sizes": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
