"""Pretraining a toy base is a function of its config: the model's initial weights come from
``cfg.seed``, not from whatever torch's global generator held before."""

import torch
from safetensors.torch import load_file

from pgraft.apps.toy.train import ToyConfig, pretrain_toy


def test_same_config_same_base_whatever_the_global_generator(tmp_path):
    cfg = ToyConfig(pretrain_steps=5, hidden=8, depth=1, n_data=64, pretrain_batch=16)
    weights = []
    for i, state in enumerate((1, 2)):
        with torch.random.fork_rng():
            torch.manual_seed(state)  # a different global state before each pretraining
            pretrain_toy(cfg, tmp_path / f"base{i}", show_progress=False)
        weights.append(load_file(tmp_path / f"base{i}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
