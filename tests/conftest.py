from pathlib import Path

import pytest
import torch

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
