import os
from pathlib import Path

import pytest
import torch

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite's models are tiny: a second intra-op thread buys nothing, and on a shared CPU two threads
# stall each other so badly that small steps run tens of times slower.
torch.set_num_threads(1)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST test set beside the repository (see ../shared/data/mnist/README.md)."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def float64():
    """Run in float64, so that batched and one-patch-at-a-time backbones agree to rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
