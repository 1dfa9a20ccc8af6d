"""The training engine: builders from a config (:mod:`~patchgd.engine.data`, :mod:`~patchgd.engine.build`),
the epoch loop and evaluation (:mod:`~patchgd.engine.loop`), resume and run files
(:mod:`~patchgd.engine.state`), the memory planner (:mod:`~patchgd.engine.plan`) and :func:`fit`
(:mod:`~patchgd.engine.trainer`), which ties them together. Modules import downwards only:
``trainer`` -> ``plan`` -> ``build``, ``data``; ``loop`` -> ``data``; ``state`` stands alone.

Example:
    >>> from patchgd.config import load_config
    >>> from patchgd.engine import fit
    >>> summary = fit(load_config("demo"))  # doctest: +SKIP
"""

from .trainer import fit
from .loop import DivergenceError, evaluate

__all__ = ["DivergenceError", "evaluate", "fit"]
