"""patchgd: train image classifiers end-to-end on very large images with Patch Gradient Descent.

Gupta, Mago, Chavan, Prasad, Thomas, "Patch Gradient Descent: Training Neural Networks on Very Large
Images", TMLR 2024 (arXiv 2301.13817).

The public names are imported on first use, so that ``patchgd --help`` (and any module that needs no
model) does not pay for importing torch.
"""

import importlib

__all__ = ["PatchGDClassifier", "PatchGD", "GD", "GDClassifier", "GDExtendedClassifier", "Method", "create_model",
           "create_method", "load_model", "predict", "register_head", "register_method", "register_reader"]
__version__ = "0.1.0"

_HOMES = {"PatchGD": "methods", "GD": "methods", "Method": "methods", "create_method": "methods",
          "create_model": "methods", "register_head": "registry", "register_method": "registry",
          "register_reader": "registry",
          "PatchGDClassifier": "model", "GDClassifier": "model", "GDExtendedClassifier": "model",
          "load_model": "inference", "predict": "inference"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
