"""Heads, methods and slide readers by name: the tables a config's names are looked up in, and the
decorators that add to them (timm's ``register_model``).

A built-in is declared below by where it lives (``"module:attribute"``) and imported only when it is built,
so a config is checked before torch loads. Your own part is one module and one decorator::

    import patchgd

    @patchgd.register_head("linear", bag=True)
    def linear_head(latent_dim, num_classes, **head_args):
        return MyHead(latent_dim, num_classes, **head_args)

after which ``model.head: linear`` trains from a config (``model.head_args`` reaches it). For the
``patchgd`` command to see a part registered outside the package, the package that holds it declares an
entry point in the group ``patchgd.plugins`` (``[project.entry-points."patchgd.plugins"] mine =
"mypackage.heads"``): a name not found is looked for once more after importing them.

What each table holds (docs/code-layout.md, "How to add a head, a method, a reader"):

* :data:`HEADS`: ``(latent_dim, num_classes, **head_args) -> nn.Module`` mapping ``Z`` ``(B, s, m, n)`` to
  logits; ``bag=True`` for a head that takes any set of cells (what ``method: subbag`` needs).
* :data:`METHODS`: a :class:`patchgd.methods.Method` (its model from a config and its step);
  ``patches=True`` for a method whose model cuts images into patches and fills ``Z``.
* :data:`READERS`: a :class:`~patchgd.data.readers.PatchSource` class built as ``cls(path, in_chans=...,
  level=..., mpp=..., slide_mpp=...)``, with the ``suffixes`` it claims; its ``claims(path)`` says whether
  it reads that file. The first in order that claims a file reads it, unless ``data.reader`` names one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any

__all__ = ["HEADS", "METHODS", "PLUGIN_GROUP", "READERS", "Registry", "patch_method", "register_head",
           "register_method", "register_reader", "suffixes"]

PLUGIN_GROUP = "patchgd.plugins"
_plugins_loaded = False


def _load_plugins() -> bool:
    """Import the ``patchgd.plugins`` entry points of the installed packages, once; True the first time."""
    global _plugins_loaded
    if _plugins_loaded:
        return False
    _plugins_loaded = True
    for entry in metadata.entry_points(group=PLUGIN_GROUP):
        entry.load()
    return True


class Registry:
    """Names of one kind of part, each with its builder (or where to import it from) and what it declares.

    Args:
        kind: What the names are (``"head"``), for messages.
        key: The config key that names one (``"model.head"``), for messages.
    """

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, tuple[Any, dict[str, Any]]] = {}

    def declare(self, name: str, target: str, **info: Any) -> None:
        """A built-in: ``target`` is ``"module:attribute"``, imported when first built."""
        self._entries[name] = (target, info)

    def register(self, name: str, **info: Any) -> Callable[[Any], Any]:
        """Decorator: add the decorated builder under ``name``, with what it declares (``info``).

        Raises:
            ValueError: ``name`` is taken.
        """
        def add(builder: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered already; choose another name")
            self._entries[name] = (builder, info)
            return builder
        return add

    def names(self) -> list[str]:
        """Every name, the built-ins first, in the order they were added."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or (_load_plugins() and name in self._entries)

    def check(self, name: str) -> None:
        """Raise ValueError, naming the config key and the names there are, unless ``name`` is known."""
        if name in self:
            return
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{self.key}={name!r}: no such {self.kind}; expected one of {', '.join(self.names())}, or "
                         f"one registered with patchgd.register_{self.kind}{hint}")

    def info(self, name: str) -> dict[str, Any]:
        """What ``name`` declared when it was added (e.g. a reader's ``suffixes``)."""
        self.check(name)
        return self._entries[name][1]

    def get(self, name: str) -> Any:
        """The builder of ``name``, imported on first use."""
        self.check(name)
        target, info = self._entries[name]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            target = getattr(importlib.import_module(module), attribute)
            self._entries[name] = (target, info)
        return target


HEADS = Registry("head", "model.head")
HEADS.declare("conv", "patchgd.model.heads:ConvHead")  # the paper's
HEADS.declare("conv1d", "patchgd.model.heads:conv1d_head")
HEADS.declare("transformer", "patchgd.model.heads:TransformerHead")
HEADS.declare("attention", "patchgd.model.heads:AttentionMILHead", bag=True)
HEADS.declare("mean", "patchgd.model.heads:MeanPoolHead", bag=True)

METHODS = Registry("method", "method")
METHODS.declare("patchgd", "patchgd.methods.registry:PATCHGD", patches=True)
METHODS.declare("gd", "patchgd.methods.registry:GD_METHOD", patches=False)
METHODS.declare("gd-extended", "patchgd.methods.registry:GD_EXTENDED", patches=False)
METHODS.declare("subbag", "patchgd.methods.registry:SUBBAG", patches=True, bag=True)

READERS = Registry("reader", "data.reader")
_TIFF = (".tif", ".tiff")
READERS.declare("openslide", "patchgd.data.readers.openslide_reader:OpenSlideSource",
                suffixes=(".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", *_TIFF))
# SVS, NDPI, SCN and BIF are TIFFs too: tifffile reads them where OpenSlide is not installed.
READERS.declare("tiff", "patchgd.data.readers.tiff:TiffSource", suffixes=(".svs", ".ndpi", ".scn", ".bif", *_TIFF))
READERS.declare("image", "patchgd.data.readers.image:ImageFileSource", suffixes=(".png", ".jpg", ".jpeg", *_TIFF))

register_head = HEADS.register
register_method = METHODS.register
register_reader = READERS.register


def patch_method(name: str) -> bool:
    """Whether method ``name``'s model cuts images into patches and fills ``Z`` (PatchGD, sub-bags)."""
    return name in METHODS and METHODS.info(name).get("patches", False)


def suffixes() -> tuple[str, ...]:
    """Every file suffix some reader claims: what a data set folder lists."""
    # the plain images' first: the order error messages list them in and image ids are looked up in
    return tuple(dict.fromkeys(s for name in reversed(READERS.names()) for s in READERS.info(name).get("suffixes", ())))
