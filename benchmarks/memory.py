"""Peak memory of one training step against image size, for GD and PatchGD.

PatchGD keeps the number of gradient-carrying patches fixed (``k`` per image and inner iteration,
whatever the image size), so its step peak should grow only by the input and ``Z``; GD's grows with the
image area. Each method is measured with :class:`patchgd.memory.PeakMemory` on a step taken after a
warm-up step (Adam's state exists by then), with the model, the optimizer and the input as baseline,
so the peak is absolute. Images are uint8, as the datasets yield them (the model normalises per patch).

``--input tensor`` holds each batch as one uint8 tensor (counted in the peak); ``--input slide`` writes
each image as a tiled TIFF and trains on it read in pieces (PatchGD only), so that the step holds no
image at all, only its patches and ``Z``. Target: PatchGD's peak at the largest size at most 1.05x its
peak at the smallest, with ``--input slide``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import tifffile
import torch

from patchgd.data.readers import open_source
from patchgd.data.lazy import LazyImage
from patchgd.grid import grid_shape
from patchgd.io import atomic_file
from patchgd.memory import PeakMemory, format_size
from patchgd.methods import GD, PatchGD, sample_schedule
from ._common import main_of, add_common_arguments, build_model, format_table, resolve_device, write_json

TARGET = 1.05
MIB = 1024**2


def register(subparsers) -> None:
    """Add the ``memory`` subcommand."""
    parser = subparsers.add_parser("memory", help="training-step peak memory vs image size, GD and PatchGD "
                                   f"(target: PatchGD <= {TARGET}x)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, image_sizes=[512, 1024, 2048, 4096], repeats=None)
    parser.add_argument("--patches", type=int, default=4,
                        help="PatchGD's gradient-carrying patches per image and inner iteration, k (default 4)")
    parser.add_argument("--inner-iterations", type=int, default=2,
                        help="PatchGD's inner iterations; the peak is reached by the second, when gradients "
                             "from the first are held (default 2)")
    parser.add_argument("--methods", nargs="+", choices=("gd", "patchgd"), default=["gd", "patchgd"],
                        help="methods to measure (default both)")
    parser.add_argument("--input", choices=("tensor", "slide"), default="tensor",
                        help="PatchGD's images: one uint8 tensor per batch, or tiled TIFFs read in pieces "
                             "(written to a temporary folder, deleted after; default tensor)")
    parser.set_defaults(func=run)


class Stepper:
    """One method's model, optimizer and step, ready to be measured at any image size."""

    def __init__(self, method: str, args: argparse.Namespace, device: torch.device):
        self.method, self.args, self.device = method, args, device
        self.model = build_model(method, args, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        if method == "patchgd":
            self.trainer = PatchGD(self.model, self.optimizer, inner_iterations=args.inner_iterations, amp=args.amp)
        else:
            self.trainer = GD(self.model, self.optimizer, amp=args.amp)
        self.generator = torch.Generator().manual_seed(args.seed)

    def step(self, images: torch.Tensor | list, labels: torch.Tensor, size: int) -> dict:
        if self.method == "gd":
            return self.trainer.step(images, labels)
        rows, cols = grid_shape(size, size, self.args.patch_size)
        if self.args.patches > rows * cols:
            raise ValueError(f"--patches {self.args.patches} exceeds the {rows}x{cols} cells of a {size} px image")
        # An explicit schedule holds k fixed exactly; a sampling fraction k / cells could round to k + 1.
        schedule = sample_schedule(len(images), rows * cols, self.args.patches, self.args.inner_iterations,
                                   self.generator)
        return self.trainer.step(images, labels, schedule=schedule)

    def batch(self, size: int, folder: Path) -> tuple[torch.Tensor | list, list]:
        """A batch of uint8 ``size`` px images, as ``--input`` asks, and the tensors it holds."""
        pixels = torch.randint(0, 256, (self.args.batch_size, 3, size, size), dtype=torch.uint8)
        if self.method == "gd" or self.args.input == "tensor":
            images = pixels.to(self.device)
            return images, [images]
        lazy = []
        for i, image in enumerate(pixels):
            path = folder / f"{size}-{i}.tif"
            tifffile.imwrite(path, image.permute(1, 2, 0).numpy(), tile=(256, 256), photometric="rgb")
            lazy.append(LazyImage(open_source(path)))
        return lazy, []

    def measure(self, size: int, folder: Path) -> dict:
        """The peak of one step on a ``size`` px batch, with the input's and ``Z``'s own bytes."""
        args = self.args
        images, held = self.batch(size, folder)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), device=self.device)
        rows, cols = grid_shape(size, size, args.patch_size)
        record = {"image_size": size, "input_bytes": sum(t.numel() * t.element_size() for t in held),
                  "z_bytes": args.batch_size * args.latent_dim * rows * cols * torch.get_default_dtype().itemsize
                  if self.method == "patchgd" else 0}
        try:
            with PeakMemory(self.device, baseline=[self.model, self.optimizer, *held]) as meter:
                stats = self.step(images, labels, size)
        except torch.OutOfMemoryError:
            return {**record, "peak_bytes": None, "baseline_bytes": None, "step_s": None, "error": "out of memory"}
        return {**record, "peak_bytes": meter.peak_bytes, "baseline_bytes": meter.baseline_bytes,
                "step_s": stats["step_time"]}


def summarise(method: str, rows: list[dict]) -> dict:
    """Growth from the smallest to the largest size, and for PatchGD the growth input and ``Z`` explain."""
    first, last = rows[0], rows[-1]
    summary = {"sizes": rows, "ratio": None}
    if first["peak_bytes"] and last["peak_bytes"]:
        summary["ratio"] = last["peak_bytes"] / first["peak_bytes"]
        own = lambda r: r["peak_bytes"] - r["input_bytes"] - r["z_bytes"]  # noqa: E731
        summary["ratio_without_input_and_z"] = own(last) / own(first)
        summary["expected_peak_bytes"] = first["peak_bytes"] + (last["input_bytes"] + last["z_bytes"]) - (
            first["input_bytes"] + first["z_bytes"])
    return summary


def plot(results: dict, png: Path) -> None:
    """Log-log peak memory against image side, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, summary in results.items():
        points = [(r["image_size"], r["peak_bytes"] / MIB) for r in summary["sizes"] if r["peak_bytes"]]
        ax.plot(*zip(*points), "o-", label=method)
        if method == "patchgd":
            base = summary["sizes"][0]
            extra = lambda r: (r["input_bytes"] + r["z_bytes"] - base["input_bytes"] - base["z_bytes"]) / MIB  # noqa: E731
            ax.plot([r["image_size"] for r in summary["sizes"]],
                    [base["peak_bytes"] / MIB + extra(r) for r in summary["sizes"]], "k:",
                    label="patchgd at smallest + input + Z")
    ax.set(xscale="log", yscale="log", xlabel="image side (px)", ylabel="training-step peak (MiB)",
           title="Peak memory of one training step")
    ax.set_xticks([r["image_size"] for r in next(iter(results.values()))["sizes"]])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Measure each method at each size, print the table, write ``memory.json`` and ``memory.png``."""
    device = resolve_device(args)
    sizes = sorted(args.image_sizes)
    results = {}
    for method in args.methods:
        stepper = Stepper(method, args, device)
        with tempfile.TemporaryDirectory(prefix="patchgd-memory-") as folder:
            warm, _ = stepper.batch(sizes[0], Path(folder))
            stepper.step(warm, torch.zeros(args.batch_size, dtype=torch.long, device=device), sizes[0])
            del warm
            results[method] = summarise(method, [stepper.measure(size, Path(folder)) for size in sizes])
        del stepper

    print(f"training-step peak memory: {args.backbone}, batch {args.batch_size}, {device}; PatchGD "
          f"{args.patch_size} px patches, k = {args.patches}, {args.inner_iterations} inner iterations, "
          f"input {args.input}")
    table = []
    for method, summary in results.items():
        for r in summary["sizes"]:
            peak = format_size(r["peak_bytes"]) if r["peak_bytes"] else r["error"]
            table.append([method, r["image_size"], peak, format_size(r["input_bytes"]), format_size(r["z_bytes"]),
                          r["step_s"] if r["step_s"] is not None else "-"])
    print(format_table(["method", "image px", "peak", "input", "Z", "metered step s"], table))
    for method, summary in results.items():
        if summary["ratio"] is not None:
            line = f"{method}: peak {sizes[-1]}/{sizes[0]} px = {summary['ratio']:.3f}x"
            if method == "patchgd":
                line += (f" (target <= {TARGET}); input + Z alone predict {format_size(summary['expected_peak_bytes'])}"
                         f"; without input and Z the peak grows {summary['ratio_without_input_and_z']:.3f}x")
            print(line)
    patchgd_ratio = results.get("patchgd", {}).get("ratio")
    payload = {"target_ratio": TARGET, "met": patchgd_ratio is not None and patchgd_ratio <= TARGET,
               "methods": results}
    write_json(args, "memory", device, payload)
    png = Path(args.out) / "memory.png"
    plot(results, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
