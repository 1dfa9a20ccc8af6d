"""Training-step peak memory of large encoders: k patches with gradients, with and without gradient
checkpointing and freezing, and the largest k that fits a GPU.

Each encoder (random-initialised timm models; nothing is downloaded) is measured as PatchGD trains it:
one image whose grid holds exactly ``k`` patches of ``--patch-size`` px, two inner iterations of all
``k`` cells (the peak is reached by the second, when the first one's gradients are held) and an Adam
update, with Adam's state already in place. The tensor peak comes from :class:`patchgd.memory.PeakMemory`
(the model, its gradients, Adam's state, ``Z``, the activations autograd keeps). A ``k`` whose peak, as
extrapolated from the smaller ``k`` measured, would pass ``--memory-limit`` (or that is above
``--max-measured-k``) is not run: its row is the linear extrapolation, marked so. The largest ``k`` for each ``--budgets`` entry comes from the same
linear fit ``peak = a + b k`` over the measured rows. On a GPU the caching allocator and kernel workspaces
add to the tensor peak: leave some headroom (the planner, ``memory.budget``, measures the real thing).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from patchgd.model.backbones import freeze_encoder
from patchgd.memory import PeakMemory, format_size, parse_size
from patchgd.methods import PatchGD, create_model
from patchgd.engine.build import parameter_groups
from ._common import main_of, format_table, resolve_device, write_json

ENCODERS = {
    "resnet50": ("resnet50", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_large": ("vit_large_patch16_224", {}),
    # The architecture of UNI2-h (MahmoodLab/UNI2-h, its model card's timm arguments): ViT-H/14, 681M parameters.
    "uni2-h": ("vit_giant_patch14_224", {"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                                         "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                                         "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU",
                                         "reg_tokens": 8, "dynamic_img_size": True}),
}
SETTINGS = ("plain", "checkpointing", "freeze-half", "freeze-half+checkpointing", "freeze-all")


def register(subparsers) -> None:
    """Add the ``encoders`` subcommand."""
    parser = subparsers.add_parser("encoders", help="training-step peak of large encoders vs k, with "
                                   "checkpointing and freezing", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=tuple(ENCODERS),
                        default=["resnet50", "vit_small", "vit_base", "vit_large"],
                        help="encoders to measure (default resnet50 vit_small vit_base vit_large; uni2-h is "
                             "the 681M-parameter ViT-H/14 of UNI2-h)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="what to compare: no saving, checkpointing, the stem and first half of the stages "
                             "or blocks frozen (with or without checkpointing), the whole encoder frozen")
    parser.add_argument("--patches", type=int, nargs="+", default=[4, 16, 64],
                        help="k, the patches with gradients per inner iteration (default 4 16 64)")
    parser.add_argument("--patch-size", type=int, default=224, help="patch side in pixels (default 224)")
    parser.add_argument("--memory-limit", default="20GiB",
                        help="do not run a k whose extrapolated peak passes this; extrapolate it (default 20GiB, "
                             "for a 24 GiB machine)")
    parser.add_argument("--max-measured-k", type=int, default=None,
                        help="extrapolate every larger k instead of running it (a CPU's time, not its memory, "
                             "is then the limit; default: run every k that fits --memory-limit)")
    parser.add_argument("--budgets", nargs="+", default=["24GB", "80GB"],
                        help="GPU memories to state the largest k for (default 24GB 80GB)")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="mixed precision (default float32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", help="folder for encoders.json")
    parser.set_defaults(func=run)


def build(encoder: str, setting: str, patch_size: int) -> torch.nn.Module:
    """The PatchGD model of ``encoder`` under ``setting`` (random weights), built once and then frozen
    as ``model.freeze`` would (half: the stem and the first half of timm's coarse groups after it)."""
    from timm.models import group_parameters

    name, args = ENCODERS[encoder]
    model = create_model("patchgd", name, 2, patch_size=patch_size, backbone_args=args,
                         grad_checkpointing="checkpointing" in setting)
    features = model.backbone.features
    if setting.startswith("freeze-all"):
        freeze_encoder(features, "all")
    elif setting.startswith("freeze-half"):
        freeze_encoder(features, (len(group_parameters(features, features.group_matcher(coarse=True))) - 1) // 2)
    return model


def measure(model: torch.nn.Module, k: int, device: torch.device, amp: str | None) -> int:
    """Tensor peak of one PatchGD step on a 1 x k grid, two inner iterations of all k cells."""
    model.to(device)
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-4))
    for group in optimizer.param_groups:  # Adam's state in place, as in any step after the first
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer = PatchGD(model, optimizer, amp=amp)
    p = model.patch_size
    image = torch.randint(256, (1, 3, p, p * k), dtype=torch.uint8)
    schedule = [torch.arange(k), torch.arange(k)]
    with PeakMemory(device, baseline=(model, optimizer, image)) as meter:
        trainer.step(image, torch.tensor([1]), schedule=schedule)
    return meter.peak_bytes


def _fit(points: dict[int, int]) -> tuple[float, float]:
    """``(a, b)`` of ``peak = a + b k`` through the measured points (least squares)."""
    ks = np.array(sorted(points), dtype=float)
    if len(ks) == 1:
        return float(points[int(ks[0])]), 0.0
    b, a = np.polyfit(ks, [points[int(k)] for k in ks], 1)
    return float(a), float(b)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args)
    limit = parse_size(args.memory_limit)
    budgets = {text: parse_size(text) for text in args.budgets}
    rows, results = [], []
    for encoder in args.encoders:
        for setting in args.settings:
            torch.manual_seed(args.seed)
            model = build(encoder, setting, args.patch_size)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            measured: dict[int, int] = {}
            for k in sorted(args.patches):
                a, b = _fit(measured) if measured else (0.0, 0.0)
                too_long = args.max_measured_k is not None and k > args.max_measured_k
                if len(measured) >= 2 and (a + b * k > limit or too_long):
                    peak, how = int(a + b * k), "extrapolated"
                else:
                    peak, how = measure(model, k, device, args.amp), "measured"
                    measured[k] = peak
                print(f"{encoder} {setting} k={k}: {format_size(peak)} ({how})", flush=True)
                results.append({"encoder": encoder, "setting": setting, "k": k, "peak_bytes": peak, "how": how,
                                "parameters": total, "trainable": trainable})
                rows.append([encoder, setting, k, format_size(peak), how])
            a, b = _fit(measured)
            # None: one measured k gives no slope (the peak then barely grows with k, e.g. a frozen encoder).
            largest = {text: (max(int((size - a) // b), 0) if b > 0 else None) for text, size in budgets.items()}
            results.append({"encoder": encoder, "setting": setting, "fit_bytes": [a, b], "largest_k": largest,
                            "parameters": total, "trainable": trainable})
            rows.append([encoder, setting, "fit", f"{format_size(a)} + {format_size(b)} x k",
                         ", ".join(f"k<={v} in {t}" for t, v in largest.items())])
            del model
    print(format_table(["encoder", "setting", "k", "tensor peak", "how / largest k"], rows))
    write_json(args, "encoders", device, {"rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
