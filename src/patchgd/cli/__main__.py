"""``python -m patchgd.cli``: the ``patchgd`` command, as ``python -m patchgd``."""

import sys

from . import main

sys.exit(main())
