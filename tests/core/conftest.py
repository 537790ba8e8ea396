import pytest
import torch

from pgraft.apps.toy.train import ToyConfig, pretrain_toy


@pytest.fixture(scope="session")
def trained_toy_base(tmp_path_factory):
    """(ToyConfig, base) of a small toy base pretrained once per session, for the likelihood-based
    baselines' tests (policy gradient / GRPO, DiffusionNFT)."""
    toy = ToyConfig(n_steps=10, pretrain_steps=300, hidden=32, depth=2, n_data=4000)
    # pretrain_toy seeds torch's global generator for the model's init: keep that from leaking into other tests
    with torch.random.fork_rng():
        return toy, pretrain_toy(toy, tmp_path_factory.mktemp("base"), show_progress=False).eval()
