"""GRPO-style options of the policy-gradient baseline: group-relative advantages and the KL term."""

import math

import pytest
import torch

from pgraft.apps.toy.train import log_prob_fn, make_problem
from pgraft.core.policy_gradient import PGConfig, kl_penalty, round_advantages, run_policy_gradient


def test_grpo_advantages_are_standardised_within_each_group_in_closed_form():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = round_advantages(r, g, "grpo", clip=5.0)
    # group 0: mean 2, population std sqrt(2/3) -> (-sqrt(3/2), 0, sqrt(3/2)); group 1: mean 20, std sqrt(200)
    s = math.sqrt(1.5)
    expected = torch.tensor([-s, 0.0, s, -10 / math.sqrt(200), -10 / math.sqrt(200), 20 / math.sqrt(200)])
    assert torch.allclose(a, expected, atol=1e-6)
    for k in (0, 1):
        assert a[g == k].mean().item() == pytest.approx(0.0, abs=1e-6)
        assert a[g == k].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_batch_advantages_pool_the_whole_round():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = round_advantages(r, g, "batch", clip=100.0)
    assert torch.allclose(a, (r - r.mean()) / r.std(unbiased=False), atol=1e-6)
    assert not torch.allclose(a, round_advantages(r, g, "grpo", clip=100.0))


def test_a_constant_reward_group_gets_zero_advantage_not_nan():
    r = torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 2.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = round_advantages(r, g, "grpo", clip=5.0)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:3], torch.zeros(3))
    assert torch.allclose(a[3:], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5), atol=1e-6)


def test_kl_penalty_and_its_gradient_in_closed_form():
    # policy N(m, 1) at m = 0, reference N(mu, 1): KL = (m - mu)^2 / 2, dKL/dm = m - mu;
    # the penalty's mean is KL + KL^2 / 2 and its gradient (samples held fixed) is dKL/dm
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=gen, dtype=torch.float64)
    mu = 0.6
    m = torch.zeros((), dtype=torch.float64, requires_grad=True)
    log_p, log_ref = -0.5 * (x - m) ** 2, -0.5 * (x - mu) ** 2
    kl = mu**2 / 2
    penalty = kl_penalty(log_p, log_ref)
    assert penalty.item() == pytest.approx(kl + kl**2 / 2, rel=0.02)
    penalty.backward()
    assert m.grad.item() == pytest.approx(-mu, rel=0.02)
    assert kl_penalty(log_ref, log_ref).item() == 0.0


@pytest.mark.parametrize("change, message", [({"advantage": "prompt"}, "advantage must be one of"),
                                             ({"kl": -0.1}, "kl must be >= 0, got -0.1")])
def test_bad_grpo_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        PGConfig(**change)


@pytest.fixture
def toy_base(trained_toy_base):
    return trained_toy_base


@pytest.mark.slow  # pretrains a small toy base (module fixture)
def test_grpo_with_a_kl_term_raises_the_toy_reward(toy_base, tmp_path):
    toy, base = toy_base
    cfg = PGConfig(rounds=3, groups=16, group_size=8, epochs=2, batch_size=64, lr=1e-3, clip=0.2, advantage="grpo",
                   kl=0.04, sample_batch_size=128, timestep_fraction=0.5, seed=0)
    _, table = run_policy_gradient(make_problem(toy), log_prob_fn(toy), base, toy.model_config(), cfg,
                                   tmp_path / "grpo", show_progress=False)
    assert list(table["phase"]) == ["train"] * 3 + ["eval"]
    assert table["reward_mean"].iloc[-1] > table["reward_mean"].iloc[0] + 0.3
    kl = table["kl_to_base"].iloc[:3]
    # round 0 starts at the base (its first update has KL 0); the policy then drifts away from it
    assert (kl >= 0).all() and kl.iloc[0] < 0.1 and kl.iloc[-1] > kl.iloc[0]


@pytest.mark.slow  # pretrains a small toy base (module fixture)
def test_the_kl_term_keeps_the_policy_nearer_the_base(toy_base, tmp_path):
    toy, base = toy_base
    out = {}
    for beta in (1e-9, 1.0):  # 1e-9: the KL is measured but has no effect on the updates
        cfg = PGConfig(rounds=2, groups=16, group_size=8, epochs=2, batch_size=64, lr=1e-3, clip=0.2, kl=beta,
                       sample_batch_size=128, timestep_fraction=0.5, final_eval=False, seed=0)
        _, table = run_policy_gradient(make_problem(toy), log_prob_fn(toy), base, toy.model_config(), cfg,
                                       tmp_path / str(beta), show_progress=False)
        out[beta] = table
    assert out[1.0]["kl_to_base"].iloc[-1] < 0.5 * out[1e-9]["kl_to_base"].iloc[-1]
    assert out[1.0]["reward_mean"].iloc[-1] < out[1e-9]["reward_mean"].iloc[-1]


@pytest.mark.parametrize("dims", [1, 64, pytest.param(4096, marks=pytest.mark.slow)])
def test_per_dimension_log_ratio_of_sampled_steps_shrinks_as_one_over_sqrt_d(dims):
    # docs/derivations.md section 4: a mean shift of delta sigma per entry gives a sample x = mu_old + sigma z
    # the per-dimension log-ratio delta * mean(z) - delta^2 / 2: spread delta / sqrt(D), so a fixed clip range
    # bounds delta at about eps * sqrt(D) (why the toy, D = 1, does not use DDPO's 1e-4)
    from pgraft.core.policy_gradient import state_dims

    gen = torch.Generator().manual_seed(dims)
    delta, n = 0.1, 20_000
    z = torch.randn(n, dims, generator=gen, dtype=torch.float64)
    log_new, log_old = (-0.5 * (z - delta) ** 2).sum(1), (-0.5 * z**2).sum(1)
    per_dim = (log_new - log_old) / state_dims(z)
    assert per_dim.mean().item() == pytest.approx(-delta**2 / 2, abs=4 * delta / math.sqrt(dims * n))
    assert per_dim.std().item() == pytest.approx(delta / math.sqrt(dims), rel=0.03)
