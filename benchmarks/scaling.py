"""Data-parallel scaling: training images per second on 1 process and on the N processes of a group.

Run it under torchrun, e.g. ``torchrun --standalone --nproc_per_node 2 -m benchmarks.scaling``. Each
round, in turns: rank 0 trains a step alone (a model of its own, no DDP) while the others wait, then
every process trains a step of the same per-process batch under DistributedDataParallel. Throughput is
``batch / step time`` alone and ``N * batch / step time`` together; the scaling efficiency is their ratio
over ``N`` (1.0: N processes train N times as many images per second). For PatchGD it also times the fill
of one batch alone against :func:`~patchgd.distributed.parallel_fill` over the group. Without torchrun
only the 1-process figures are measured.

On a CPU the processes share its cores, so the figure is a correctness-and-overhead one (what gloo and
DDP's bookkeeping cost); on one GPU per process it is the real scaling.
"""

from __future__ import annotations

import argparse
import sys

import torch

from patchgd import distributed
from patchgd.methods import create_method
from patchgd.registry import METHODS
from patchgd.model.fill import fill_chunk
from ._common import (main_of, add_common_arguments, build_model, format_table, interleaved, median, resolve_device,
                      write_json)


def register(subparsers) -> None:
    """Add the ``scaling`` subcommand."""
    parser = subparsers.add_parser("scaling", help="training images/s on 1 and N processes (run under torchrun)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[256], batch_size=4, backbone="resnet18")
    parser.add_argument("--method", choices=METHODS.names(), default="patchgd", help="method to train (default patchgd)")
    parser.add_argument("--sampling", type=float, default=0.25,
                        help="PatchGD fraction of cells per inner iteration (default 0.25)")
    parser.add_argument("--fill-batch-size", type=int, default=None,
                        help="patches per backbone call of the fills, alone and parallel (default: one grid row "
                             "of every image, fill_z's own default); the parallel fill splits these chunks")
    parser.set_defaults(func=run)


def _trainer(args: argparse.Namespace, device: torch.device, wrap=None):
    model = build_model(args.method, args, device)
    return create_method(args.method, model, torch.optim.Adam(model.parameters(), lr=1e-4), amp=args.amp,
                         sampling=args.sampling, wrap=wrap)


def measure(args: argparse.Namespace, size: int, device: torch.device) -> dict:
    """Time a training step alone and together (and PatchGD's fill) on ``size`` x ``size`` images."""
    world = distributed.world_size()
    alone, together = _trainer(args, device), _trainer(args, device, wrap=distributed.ddp(device))
    torch.manual_seed(args.seed + distributed.rank())  # each process its own images, as in training
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def on_rank_zero(fn):
        def call():
            if distributed.is_main():
                fn()
            distributed.barrier()
        return call

    def on_all(fn):
        def call():
            fn()
            distributed.barrier()
        return call

    contenders = {"alone": on_rank_zero(lambda: alone.step(images, labels)),
                  "together": on_all(lambda: together.step(images, labels))}
    if args.method == "patchgd":
        torch.manual_seed(args.seed)  # the parallel fill splits one batch that every process holds
        shared = torch.randn(args.batch_size, 3, size, size, device=device)
        model = alone.model
        grid = model.grid(shared)
        chunk = fill_chunk(grid.batch_size, grid.cols, False, fill_batch_size=args.fill_batch_size)
        contenders["fill alone"] = on_rank_zero(lambda: model.fill_z(grid, chunk))
        contenders["parallel fill"] = on_all(lambda: distributed.parallel_fill(model, grid, chunk))
    samples = interleaved(contenders, args.repeats, args.warmup, device)
    seconds = {name: median([s for s, _ in pairs]) for name, pairs in samples.items()}
    row = {"image_size": size, "processes": world, "step_alone_s": seconds["alone"],
           "step_together_s": seconds["together"],
           "images_per_s_1": args.batch_size / seconds["alone"],
           "images_per_s_n": world * args.batch_size / seconds["together"],
           "efficiency": seconds["alone"] / seconds["together"],
           "samples_s": {name: [s for s, _ in pairs] for name, pairs in samples.items()}}
    if args.method == "patchgd":
        row.update(fill_alone_s=seconds["fill alone"], parallel_fill_s=seconds["parallel fill"],
                   fill_speedup=seconds["fill alone"] / seconds["parallel fill"])
    return row


def run(args: argparse.Namespace) -> int:
    """Measure every image size, print the table and write ``scaling.json`` (rank 0)."""
    with distributed.process_group(args.device):
        device = distributed.local_device(resolve_device(args))
        rows = [measure(args, size, device) for size in args.image_sizes]
        if not distributed.is_main():
            return 0
        world = distributed.world_size()
        print(f"data-parallel scaling: {args.method}, {args.backbone}, batch {args.batch_size} per process, "
              f"{world} process(es), {device}, median of {args.repeats}")
        if world == 1:
            print("one process only: run under torchrun --nproc_per_node N to measure N processes")
        headers = ["image px", "N", "img/s 1 proc", "img/s N procs", "efficiency"]
        if args.method == "patchgd":
            headers += ["fill 1 proc s", "parallel fill s", "fill speed-up"]
        print(format_table(headers, [
            [r["image_size"], r["processes"], r["images_per_s_1"], r["images_per_s_n"], r["efficiency"]]
            + ([r["fill_alone_s"], r["parallel_fill_s"], r["fill_speedup"]] if args.method == "patchgd" else [])
            for r in rows]))
        write_json(args, "scaling", device, {"processes": world, "sizes": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
