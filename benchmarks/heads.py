"""The conv head against the transformer head: PatchGD step time, head time and peak memory on the same run.

Both models share the backbone (same weights, from the same seed), the images, the batch and the schedule;
only the head differs. Per image size: the whole ``PatchGD.step``, timed in turns (conv, transformer,
conv, ...) and reported as the median; the head alone (a forward and backward on a filled ``Z``, a small
call) by ``torch.utils.benchmark``'s blocked timer and its median; and the peak memory of one step after a
warm-up step (model, optimizer and input counted as baseline).
"""

from __future__ import annotations

import argparse
import sys

import torch

from patchgd.memory import PeakMemory, format_size
from patchgd.methods import PatchGD, classification_loss, create_model
from ._common import (add_common_arguments, format_table, interleaved, main_of, median, resolve_device,
                      small_call_seconds, write_json)

HEADS = ("conv", "transformer")


def register(subparsers) -> None:
    """Add the ``heads`` subcommand."""
    parser = subparsers.add_parser("heads", help="conv head vs transformer head: step time, head time, peak memory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[512, 1024], batch_size=2)
    parser.add_argument("--sampling", type=float, default=0.25,
                        help="fraction of cells per inner iteration (default 0.25)")
    parser.add_argument("--transformer-width", type=int, default=192,
                        help="token width of the transformer head (default 192; the conv head uses --head-width)")
    parser.add_argument("--transformer-depth", type=int, default=2, help="encoder layers (default 2)")
    parser.add_argument("--transformer-heads", type=int, default=4, help="attention heads (default 4)")
    parser.set_defaults(func=run)


def build(head: str, args: argparse.Namespace, device: torch.device) -> PatchGD:
    """A PatchGD trainer whose model has ``head``; the backbone is the same for every head (same seed)."""
    torch.manual_seed(args.seed)
    width = args.transformer_width if head == "transformer" else args.head_width
    model = create_model("patchgd", args.backbone, args.num_classes, patch_size=args.patch_size,
                         latent_dim=args.latent_dim, head=head, head_width=width, head_depth=args.transformer_depth,
                         head_heads=args.transformer_heads, channels_last=args.channels_last).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    return PatchGD(model, torch.optim.Adam(model.parameters(), lr=1e-4), sampling=args.sampling, amp=args.amp,
                   generator=generator)


def head_pass(trainer: PatchGD, z: torch.Tensor, labels: torch.Tensor):
    """The head alone: forward and backward on a filled ``Z``."""
    def run_head():
        trainer.model.head.train()
        with trainer.autocast():
            logits = trainer.model.head(z.detach().requires_grad_())
        classification_loss(logits, labels).backward()
    return run_head


def run(args: argparse.Namespace) -> int:
    """Measure each image size with both heads, print the table and write ``heads.json``."""
    device = resolve_device(args)
    trainers = {head: build(head, args, device) for head in HEADS}
    results = []
    for size in args.image_sizes:
        torch.manual_seed(args.seed)
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        with torch.no_grad():
            z = trainers["conv"].model.fill_z(images)
        steps = {head: lambda t=trainer: t.step(images, labels) for head, trainer in trainers.items()}
        samples = interleaved(steps, args.repeats, args.warmup, device)
        head_seconds = {head: small_call_seconds(head_pass(trainer, z, labels)) for head, trainer in trainers.items()}
        row = {"image_size": size, "grid": list(z.shape[2:])}
        for head, trainer in trainers.items():
            trainer.step(images, labels)  # warm: Adam's state exists
            with PeakMemory(device, baseline=(trainer.model, trainer.optimizer, images)) as meter:
                trainer.step(images, labels)
            row[head] = {"step_s": median([s for s, _ in samples[head]]),
                         "head_s": head_seconds[head],
                         "peak_bytes": meter.peak_bytes,
                         "head_parameters": sum(p.numel() for p in trainer.model.head.parameters())}
        row["ratio_step"] = row["transformer"]["step_s"] / row["conv"]["step_s"]
        row["ratio_head"] = row["transformer"]["head_s"] / row["conv"]["head_s"]
        row["ratio_peak"] = row["transformer"]["peak_bytes"] / row["conv"]["peak_bytes"]
        results.append(row)

    print(f"conv head vs transformer head: {args.backbone}, {args.patch_size} px patches, batch {args.batch_size}, "
          f"sampling {args.sampling}, {device}, steps: median of {args.repeats} interleaved, head alone: "
          f"torch.utils.benchmark's median; transformer width "
          f"{args.transformer_width}, depth {args.transformer_depth}, {args.transformer_heads} heads")
    table = []
    for r in results:
        for head in HEADS:
            h = r[head]
            table.append([r["image_size"], "x".join(map(str, r["grid"])), head, h["head_parameters"], h["step_s"],
                          h["head_s"], format_size(h["peak_bytes"])])
        table.append(["", "", "transformer/conv", "", r["ratio_step"], r["ratio_head"], f"{r['ratio_peak']:.3f}x"])
    print(format_table(["image px", "grid", "head", "head params", "step s", "head fwd+bwd s", "step peak"], table))
    write_json(args, "heads", device, {"sizes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
