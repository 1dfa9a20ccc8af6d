"""Settings for every test, the suite's and the package's docstring examples alike."""

import os

import torch

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite's models are tiny: a second intra-op thread buys nothing, and on a shared CPU two threads
# stall each other so badly that small steps run tens of times slower.
torch.set_num_threads(1)
