"""The models: the PatchGD classifier (:mod:`~patchgd.model.classifier`: a patch backbone filling ``Z``, a head
classifying it) and the GD baselines, their backbones (:mod:`~patchgd.model.backbones`: timm models as patch
encoders, freezing, checkpointing), heads (:mod:`~patchgd.model.heads`: conv, transformer, attention-MIL) and
pretrained weights (:mod:`~patchgd.model.pretrained`: timm tags, hub repositories, local snapshots).
Pixel scaling and normalisation (:mod:`patchgd.normalize`) stay a leaf below this package, since the
patch grids and the data sets scale pixels too.
"""

from .classifier import GDClassifier, GDExtendedClassifier, PatchGDClassifier

__all__ = ["GDClassifier", "GDExtendedClassifier", "PatchGDClassifier"]
