"""Settings for every test, the suite's and the package's docstring examples alike."""

import os

import pytest
import torch

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite's models are tiny: a second intra-op thread buys nothing, and on a shared CPU two threads
# stall each other so badly that small steps run tens of times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _docstring_examples_in_a_scratch_folder(request, tmp_path, monkeypatch):
    """Docstring examples write where a user would (``runs/demo/...``): here, a temporary folder outside the
    repository (recipes are found by name, as after ``pip install``), so no example leaves files in the
    working tree."""
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
