"""The built-in methods as :class:`Method` entries of :data:`patchgd.registry.METHODS`, and the Python API
that builds by name: :func:`create_model` and :func:`create_method`.

A method is its model class (built from a config by the class's ``from_config(cfg, pretrained)``, or
from keyword arguments by :func:`create_model`) and its step (``step(cfg, model, optimizer, **run)``, where
``run`` is what a training run adds: ``generator``, ``fill``, ``wrap``, ``cache``). A method of one's
own is a :class:`Method` registered with :func:`patchgd.register_method`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..config import Config
from ..model import GDClassifier, GDExtendedClassifier, PatchGDClassifier
from ..registry import METHODS
from .gd import GD
from .patchgd import PatchGD
from .subbag import SubBag

__all__ = ["GD_EXTENDED", "GD_METHOD", "Method", "PATCHGD", "SUBBAG", "create_method", "create_model"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method: the classifier it trains and the step that trains it.

    Attributes:
        model: The model class: ``model(backbone, num_classes, **options)``, and ``model.from_config(cfg,
            pretrained)`` for a run.
        step: ``step(cfg, model, optimizer, *, generator, fill, wrap, cache)`` -> an object with
            ``step(images, labels) -> dict``; ``generator`` draws the cells, ``fill`` replaces PatchGD's fill
            (the patch-parallel fill), ``wrap`` puts the forward module under DDP, ``cache`` is a cached fill
            (:class:`~patchgd.methods.cached.CachedZ`) or None.
    """

    model: type[nn.Module]
    step: Callable[..., Any]


def _patchgd_step(cfg: Config, model, optimizer, *, generator=None, fill=None, wrap=None, cache=None) -> PatchGD:
    p = cfg.patchgd
    return PatchGD(model, optimizer, p.sampling, p.max_sampled, p.inner_iterations, p.grad_accum_steps,
                   patches_per_step=p.patches_per_step, fill_mode=p.fill_mode, fill_batch_size=p.fill_batch_size,
                   amp=cfg.train.amp, generator=generator, fill=fill, wrap=wrap, cache=cache)


def _subbag_step(cfg: Config, model, optimizer, *, generator=None, wrap=None, **_) -> SubBag:
    return SubBag(model, optimizer, cfg.patchgd.sampling, amp=cfg.train.amp, wrap=wrap,
                  patches_per_step=cfg.patchgd.patches_per_step, generator=generator)


def _gd_step(cfg: Config, model, optimizer, *, wrap=None, **_) -> GD:
    return GD(model, optimizer, amp=cfg.train.amp, micro_batch_size=cfg.train.micro_batch_size, wrap=wrap)


PATCHGD = Method(PatchGDClassifier, _patchgd_step)
SUBBAG = Method(PatchGDClassifier, _subbag_step)
GD_METHOD = Method(GDClassifier, _gd_step)
GD_EXTENDED = Method(GDExtendedClassifier, _gd_step)


def _parameters(cls: type) -> set[str]:
    """The keyword arguments a model class names, its bases' included (GD-extended passes its own on)."""
    return {name for c in cls.__mro__ if issubclass(c, nn.Module) and c is not nn.Module and "__init__" in vars(c)
            for name in inspect.signature(c.__init__).parameters}


def create_model(method: str, backbone: str | nn.Module, num_classes: int, **options: Any) -> nn.Module:
    """The model ``method`` trains: its model class with ``options`` (for PatchGD and sub-bags
    :class:`~patchgd.model.PatchGDClassifier`'s arguments, ``patch_size`` among them; for ``gd``
    :class:`~patchgd.model.GDClassifier`'s; for ``gd-extended`` :class:`~patchgd.model.GDExtendedClassifier`'s).
    An option that only another method's model takes is left out, so one set of options builds each
    method's model (as a comparison of methods needs); one no model names goes on (to timm, for GD).

    Example:
        >>> create_model("patchgd", "test_resnet", 10, patch_size=32, latent_dim=16).latent_dim
        16
        >>> create_model("gd", "test_resnet", 10, patch_size=32).num_classes
        10
    """
    cls = METHODS.get(method).model
    others = set().union(*(_parameters(METHODS.get(name).model) for name in METHODS.names())) - _parameters(cls)
    return cls(backbone, num_classes, **{key: value for key, value in options.items() if key not in others})


def create_method(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, amp: str | None = None,
                  micro_batch_size: int | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                  **patchgd_options: Any) -> PatchGD | SubBag | GD:
    """The step object of a built-in ``method`` from keyword arguments: ``patchgd_options`` go to
    :class:`PatchGD` (``sampling`` and ``patches_per_step`` to :class:`SubBag`; ignored by GD),
    ``micro_batch_size`` to :class:`GD` (PatchGD bounds its memory with ``sampling`` instead), ``wrap`` (DDP)
    to all. A run builds its step from its config instead (the registered :class:`Method`'s ``step``)."""
    if method == "patchgd":
        if micro_batch_size is not None:
            raise ValueError("train.micro_batch_size splits the batches of gd and gd-extended; PatchGD bounds its "
                             "memory with patchgd.sampling or patchgd.patches_per_step instead")
        return PatchGD(model, optimizer, amp=amp, wrap=wrap, **patchgd_options)
    if method == "subbag":
        return SubBag(model, optimizer, patchgd_options.get("sampling", 0.25), amp=amp, wrap=wrap,
                      patches_per_step=patchgd_options.get("patches_per_step"), generator=patchgd_options.get("generator"))
    if method in ("gd", "gd-extended"):
        return GD(model, optimizer, amp=amp, micro_batch_size=micro_batch_size, wrap=wrap)
    METHODS.check(method)
    raise ValueError(f"create_method builds the built-in methods; {method!r} is built from a config by its "
                     "registered Method's step")
