"""patchgd: train image classifiers end-to-end on very large images with Patch Gradient Descent.

Gupta, Mago, Chavan, Prasad, Thomas, "Patch Gradient Descent: Training Neural Networks on Very Large
Images", TMLR 2024 (arXiv 2301.13817).
"""

from .methods import GD, PatchGD, create_method, create_model
from .model import GDClassifier, GDExtendedClassifier, PatchGDClassifier

__all__ = ["PatchGDClassifier", "PatchGD", "GD", "GDClassifier", "GDExtendedClassifier", "create_model",
           "create_method"]
__version__ = "0.1.0"
