"""patchgd's speed, memory and accuracy benchmarks: kept beside the package, not shipped in it.

Each module is one benchmark, run from the repository root as ``python -m benchmarks.NAME [flags]``
(or ``python -m benchmarks NAME``), with patchgd installed. Those built on the shared flags expose
``register(subparsers)``; the others (``cached_step``, ``cost_study``, ``slide_reading``) are scripts
with their own. The measured numbers and their commands are in RESULTS.md.
"""
