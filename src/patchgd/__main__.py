"""``python -m patchgd``: the ``patchgd`` command, also as ``torchrun -m patchgd train ...``."""

import sys

from .cli import main

sys.exit(main())
