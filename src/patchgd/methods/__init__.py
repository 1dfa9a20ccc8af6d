"""Training steps: PatchGD (Algorithm 1 of the paper) and the GD baselines, behind one interface.

Each method object wraps a model and an optimizer and exposes ``step(images, labels) -> dict``; a trainer
switches method by name through :data:`patchgd.registry.METHODS` (the built-ins' entries, and the Python API
:func:`create_model` and :func:`create_method`, are in :mod:`~patchgd.methods.registry`) and nothing else. :mod:`~patchgd.methods.base` holds what every step shares, :mod:`~patchgd.methods.schedule`
which cells carry gradients, :mod:`~patchgd.methods.patchgd` and :mod:`~patchgd.methods.gd` the steps.
"""

from .base import AMP_DTYPES, autocast, classification_loss, sync
from .gd import GD
from .patchgd import PatchGD
from .registry import Method, create_method, create_model
from .schedule import default_inner_iterations, patches_per_iteration, sample_schedule

__all__ = ["AMP_DTYPES", "GD", "Method", "PatchGD", "autocast", "classification_loss", "create_method", "create_model",
           "default_inner_iterations", "patches_per_iteration", "sample_schedule", "sync"]
