"""Step time: ``PatchGD.step`` against the sum of its parts, and against a GD step on the same images.

The parts are what one Algorithm-1 iteration cannot avoid, run directly on pre-cut patches: a no-grad
forward of every patch in the chunks the step fills with, then per inner iteration a forward/backward of
the sampled patches through the backbone, a forward/backward of the head on a ``Z`` tensor, and the
optimizer step. ``step / parts`` is the cost of the library's bookkeeping (cutting patches, writing and
detaching ``Z``, sampling, checks). Target: at most 1.10.
"""

from __future__ import annotations

import argparse
import sys

import torch

from patchgd.methods import GD, PatchGD, classification_loss
from ._common import (main_of, add_common_arguments, build_model, format_table, interleaved, median, resolve_device,
                      timed, write_json)

TARGET = 1.10


def register(subparsers) -> None:
    """Add the ``step`` subcommand."""
    parser = subparsers.add_parser("step", help="PatchGD.step against its parts and a GD step (target <= 1.10)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[512], batch_size=2)
    parser.add_argument("--sampling", type=float, default=0.25,
                        help="fraction of cells per inner iteration (default 0.25)")
    parser.add_argument("--max-sampled", type=float, default=1.0,
                        help="fraction of cells visited per step (default 1.0)")
    parser.set_defaults(func=run)


def parts(trainer: PatchGD, images: torch.Tensor, labels: torch.Tensor):
    """One step's unavoidable work on pre-cut patches, as a function returning ``(fill_s, inner_s)``.

    The schedule comes from the trainer's own sampler, so ``k``, ``ζ`` and ``ε`` match its step's.
    """
    model, device = trainer.model, trainer.device
    grid = model.grid(images)
    schedule = trainer.schedule_for(grid, None)
    batch, zeta = grid.batch_size, len(schedule)
    k = len(schedule[0][1]) // batch
    eps = trainer.grad_accum_steps or zeta
    memory_format = torch.channels_last if model.channels_last else torch.contiguous_format
    all_cells = torch.arange(grid.num_cells, device=device).expand(batch, -1)
    # PatchGD fills in chunks of the B * k patches an inner iteration holds (its default fill_batch_size).
    fill_chunks = grid.patches(all_cells).contiguous(memory_format=memory_format).split(batch * k)
    sampled = [grid.patches(cells, images).contiguous(memory_format=memory_format) for images, cells in schedule]
    z = torch.zeros(batch, model.latent_dim, grid.rows, grid.cols, device=device)

    def fill():
        with torch.no_grad(), trainer.autocast():
            for chunk in fill_chunks:
                model.backbone(chunk)

    def inner():
        for j, ((images_j, cells), patches) in enumerate(zip(schedule, sampled), start=1):
            with trainer.autocast():
                features = model.backbone(patches)
                z_j = z.detach().requires_grad_()
                logits = model.head(z_j)
            # The loss scale 1/ε is left out: it does not change the work.
            trainer.backward(classification_loss(logits, labels))
            cell_grads = z_j.grad.view(batch, model.latent_dim, -1)[images_j, :, cells]  # (B * k, s)
            features.backward(cell_grads.to(features.dtype))
            if j % eps == 0 or j == zeta:
                trainer.update()

    def run_parts() -> tuple[float, float]:
        model.train()
        fill_s, _ = timed(fill, device)
        inner_s, _ = timed(inner, device)
        return fill_s, inner_s

    return run_parts


def run(args: argparse.Namespace) -> int:
    """Measure each image size, print the table and write ``step.json``."""
    device = resolve_device(args)
    model = build_model("patchgd", args, device)
    trainer = PatchGD(model, torch.optim.Adam(model.parameters(), lr=1e-4), sampling=args.sampling,
                      max_sampled=args.max_sampled, amp=args.amp)
    gd_model = build_model("gd", args, device)
    gd = GD(gd_model, torch.optim.Adam(gd_model.parameters(), lr=1e-4), amp=args.amp)
    results = []
    for size in args.image_sizes:
        torch.manual_seed(args.seed)
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        contenders = {"step": lambda: trainer.step(images, labels), "parts": parts(trainer, images, labels),
                      "gd": lambda: gd.step(images, labels)}
        samples = interleaved(contenders, args.repeats, args.warmup, device)
        step_s, parts_s, gd_s = (median([s for s, _ in samples[name]]) for name in ("step", "parts", "gd"))
        stats = [result for _, result in samples["step"]]
        results.append({
            "image_size": size, "inner_iterations": stats[0]["inner_iterations"],
            "patches_per_image": stats[0]["patches_per_image"],
            "step_s": step_s, "parts_s": parts_s, "gd_step_s": gd_s,
            "ratio_step_to_parts": step_s / parts_s, "ratio_step_to_gd": step_s / gd_s,
            "step_fill_s": median([s["fill_time"] for s in stats]),
            "step_inner_s": median([s["inner_time"] for s in stats]),
            "parts_fill_s": median([r[0] for _, r in samples["parts"]]),
            "parts_inner_s": median([r[1] for _, r in samples["parts"]]),
            "samples_s": {name: [s for s, _ in pairs] for name, pairs in samples.items()},
        })
    print(f"PatchGD.step vs its parts and GD: {args.backbone}, {args.patch_size} px patches, "
          f"batch {args.batch_size}, sampling {args.sampling}, {device}, median of {args.repeats}")
    print(format_table(
        ["image px", "k", "ζ", "step s", "fill s", "inner s", "parts s", "fill s", "inner s", "step/parts",
         "target", "GD s", "step/GD"],
        [[r["image_size"], r["patches_per_image"], r["inner_iterations"], r["step_s"], r["step_fill_s"],
          r["step_inner_s"], r["parts_s"], r["parts_fill_s"], r["parts_inner_s"], r["ratio_step_to_parts"],
          f"<= {TARGET}", r["gd_step_s"], r["ratio_step_to_gd"]] for r in results]))
    worst = max(r["ratio_step_to_parts"] for r in results)
    write_json(args, "step", device, {"target_ratio": TARGET, "worst_ratio": worst, "met": worst <= TARGET,
                                      "sizes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
