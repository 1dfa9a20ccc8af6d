"""UltraMNIST at CPU scale: GD, GD-extended and PatchGD under a loose and a tight memory budget.

The same as ``patchgd bench ultramnist``; see docs/ultramnist-cpu.md for the measured results.
Usage: python benchmarks/ultramnist_cpu.py [--seed 0] [--threads 1] [--out DIR] [...]
"""

import sys

from patchgd.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["ultramnist", *sys.argv[1:]]))
