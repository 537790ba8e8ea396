import os

import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps scatter-heavy ops from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
