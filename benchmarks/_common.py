"""What every benchmark shares: flags, device, models, timing, the machine record, tables and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from patchgd.io import atomic_file
from patchgd.methods import autocast, create_model, sync

# The real MNIST test set beside the repository (../shared/data/mnist), the studies' default digits.
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

__all__ = ["SHARED_MNIST", "main_of", "add_common_arguments", "resolve_device", "build_model", "autocast", "sync", "timed",
           "interleaved", "median", "small_call_seconds", "machine", "format_table", "write_json"]


def main_of(register: Callable, argv: list[str] | None = None) -> int:
    """Run the one benchmark ``register`` adds, with ``argv`` (default: the command line's) as its flags:
    what ``python -m benchmarks.NAME`` does."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    register(sub)
    args = parser.parse_args([*sub.choices, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


def add_common_arguments(parser: argparse.ArgumentParser, *, image_sizes: list[int], batch_size: int = 1,
                         repeats: int | None = 5, warmup: int = 1, backbone: str = "resnet18") -> None:
    """Add the flags every benchmark takes, with that benchmark's defaults.

    Args:
        parser: The benchmark's subparser.
        image_sizes: Default image sides in pixels.
        batch_size: Default images per batch.
        repeats: Default timed repeats (the median is reported); None for a benchmark that times nothing.
        warmup: Default untimed calls before the timed ones.
        backbone: Default timm backbone.
    """
    parser.add_argument("--backbone", default=backbone,
                        help=f"timm model name, randomly initialised; nothing is downloaded (default {backbone})")
    parser.add_argument("--patch-size", type=int, default=128, help="PatchGD patch side in pixels (default 128)")
    parser.add_argument("--image-sizes", "--image-size", dest="image_sizes", type=int, nargs="+",
                        default=image_sizes, metavar="PX",
                        help=f"square image sides in pixels (default {' '.join(map(str, image_sizes))})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images per batch (default {batch_size})")
    parser.add_argument("--latent-dim", type=int, default=256, help="PatchGD latent size s (default 256)")
    parser.add_argument("--head-width", type=int, default=256, help="channels of the conv head (default 256)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the classifier (default 10)")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats,
                            help=f"timed repeats; medians are reported (default {repeats})")
        parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls first (default {warmup})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run: auto picks cuda when available (default auto)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="mixed precision (fp16 needs cuda; default: off, float32)")
    parser.add_argument("--channels-last", action="store_true", help="feed the backbone channels-last tensors")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 keeps timings steadier on a "
                             "machine shared with other jobs")
    parser.add_argument("--seed", type=int, default=0, help="random seed of weights and images (default 0)")
    parser.add_argument("--out", default="bench-results",
                        help="folder for the JSON (and PNG) outputs (default bench-results)")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device named by ``--device`` (one clear error when CUDA is missing); applies ``--threads``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def build_model(method: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The ``method``'s model from the benchmark flags, on ``device``, seeded by ``--seed``."""
    torch.manual_seed(args.seed)
    model = create_model(method, args.backbone, args.num_classes, patch_size=args.patch_size,
                         latent_dim=args.latent_dim, head_width=args.head_width,
                         channels_last=args.channels_last)
    return model.to(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Call ``fn()`` once; return its wall time in seconds (GPU work included) and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[tuple[float, Any]]]:
    """Time several functions in turns, so that a slow phase of the machine hits all of them alike.

    Args:
        fns: Named functions to compare.
        repeats: Timed rounds; each round calls every function once, in order.
        warmup: Untimed rounds first (allocator, kernels and caches settle).
        device: Device whose queue is synchronised around each call.

    Returns:
        For each name, ``repeats`` pairs ``(seconds, result)``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be at least 1 and --warmup at least 0, got {repeats} and {warmup}")
    samples = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sample = timed(fn, device)
            if round_ >= warmup:
                samples[name].append(sample)
    return samples


def small_call_seconds(fn: Callable[[], Any], min_run_time: float = 0.2) -> float:
    """Median seconds of one call of a small ``fn`` (a head's forward and backward), by
    ``torch.utils.benchmark``: it runs ``fn`` in blocks long enough for the clock (synchronising CUDA) and
    reports the median over blocks, where timing single calls would measure the timer."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def median(values: list[float]) -> float:
    """The median, the statistic every benchmark reports (robust to a stray slow repeat)."""
    return statistics.median(values)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    record = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned columns; floats get 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(args: argparse.Namespace, name: str, device: torch.device, results: dict) -> Path:
    """Write ``<out>/<name>.json``: the benchmark, its settings, the machine and the results."""
    settings = {k: v for k, v in vars(args).items() if not callable(v)}
    payload = {"benchmark": name, "settings": settings, "machine": machine(device), "results": results}
    path = Path(args.out) / f"{name}.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
