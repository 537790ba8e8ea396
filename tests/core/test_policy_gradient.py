import pytest
import torch

from pgraft.apps.toy.train import ToyConfig, log_prob_fn, make_problem, pretrain_toy
from pgraft.core.policy_gradient import PGConfig, group_advantages, run_policy_gradient


def test_group_advantages_are_standardised_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, g, clip=5.0)
    for k in (0, 1):
        assert a[g == k].mean().item() == pytest.approx(0.0, abs=1e-6)
        assert a[g == k].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert group_advantages(r, g, clip=0.5).abs().max().item() == pytest.approx(0.5)


def test_policy_gradient_raises_the_toy_reward(tmp_path):
    toy = ToyConfig(n_steps=10, pretrain_steps=300, hidden=32, depth=2, n_data=4000)
    base = pretrain_toy(toy, tmp_path / "base", show_progress=False).eval()
    cfg = PGConfig(rounds=3, groups=16, group_size=8, epochs=2, batch_size=64, lr=1e-3, clip=0.2,
                   sample_batch_size=128, timestep_fraction=0.5, seed=0)
    _, table = run_policy_gradient(make_problem(toy), log_prob_fn(toy), base, toy.model_config(), cfg,
                                   tmp_path / "pg", show_progress=False)
    assert list(table["phase"]) == ["train"] * 3 + ["eval"]
    assert table["reward_mean"].iloc[-1] > table["reward_mean"].iloc[0] + 0.3
