import math

import pytest
import torch

from pgraft.core import grs


def test_rejection_sampling_of_gaussian_gives_shifted_gaussian(gen):
    # base N(0,1), r(x) = x, accept ∝ exp(r/α)  =>  accepted ~ N(1/α, 1)
    alpha = 2.0
    x = torch.randn(400_000, generator=gen)
    acc = grs.accept_rejection(x, alpha, None, gen)
    assert acc.sum() > 5000
    assert x[acc].mean().item() == pytest.approx(1 / alpha, abs=0.05)
    assert x[acc].std().item() == pytest.approx(1.0, abs=0.05)


def test_best_of_n_of_uniforms_is_beta_n_1(gen):
    n = 5
    u = torch.rand(n * 40_000, generator=gen)
    groups = torch.arange(len(u)) // n
    acc = grs.accept_best_of_n(u, groups, gen)
    kept = u[acc]
    assert len(kept) == 40_000  # exactly one per group
    # CDF of Beta(N, 1) is u^N: compare at a few quantiles (KS-style, tolerance ~ 3/sqrt(n))
    for q in (0.3, 0.6, 0.8, 0.95):
        assert (kept <= q).float().mean().item() == pytest.approx(q**n, abs=0.01)


def test_top_k_acceptance_matches_reshaped_reward(gen):
    m, k, alpha = 6, 2, 1.0
    u = torch.rand(m * 60_000, generator=gen)  # rewards ~ U(0,1) so F(r) = r
    groups = torch.arange(len(u)) // m
    acc = grs.accept_top_k(u, k, groups, gen)
    assert int(acc.sum()) == k * 60_000
    # P(accept | F) = exp(r̂/α) by Lemma 2.3
    bins = torch.linspace(0, 1, 11)
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = (u >= lo) & (u < hi)
        rate = acc[inside].float().mean().item()
        mid = torch.tensor([(lo + hi) / 2])
        expected = torch.exp(grs.reshaped_reward_top_k(mid, m, k, alpha) / alpha).item()
        assert rate == pytest.approx(expected, abs=0.03)


def test_top_1_reshaped_reward_equals_best_of_n():
    f = torch.tensor([0.1, 0.5, 0.9, 1.0])
    assert torch.allclose(grs.reshaped_reward_top_k(f, 7, 1, 0.5), grs.reshaped_reward_best_of_n(f, 7, 0.5))
    assert torch.allclose(grs.reshaped_reward_top_k(f, 7, 7), torch.zeros(4, dtype=torch.float64))


def test_reshaped_reward_dispatch_and_threshold():
    r = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.equal(grs.reshaped_reward(r, grs.GRSConfig(rule="rs"), 4), r.double())
    th = grs.reshaped_reward(r, grs.GRSConfig(rule="threshold", threshold=1.5), 4)
    assert th.tolist() == [-math.inf, -math.inf, 0.0, 0.0]
    bon = grs.reshaped_reward(r, grs.GRSConfig(rule="bon"), 4)
    assert torch.allclose(bon, 3 * torch.log(torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)))


def test_rank_breaks_ties_at_random_but_reproducibly():
    r = torch.zeros(6)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    ranks = {tuple(grs.rank_within_groups(r, groups, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(ranks) > 1
    again = grs.rank_within_groups(r, groups, torch.Generator().manual_seed(3))
    assert torch.equal(again, grs.rank_within_groups(r, groups, torch.Generator().manual_seed(3)))
    for g in (0, 1):
        assert sorted(again[groups == g].tolist()) == [0, 1, 2]


def test_threshold_and_accept_dispatch(gen):
    r = torch.tensor([0.1, 0.5, 0.9])
    assert grs.accept(r, None, grs.GRSConfig(rule="threshold", threshold=0.5), gen).tolist() == [False, True, True]
    assert grs.accept(r, None, grs.GRSConfig(rule="bon"), gen).tolist() == [False, False, True]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: grs.accept_rejection(torch.ones(3), 0.0), "alpha must be .* got 0.0"),
        (lambda: grs.accept_rejection(torch.ones(3), -1.0), "got -1.0"),
        (lambda: grs.accept_top_k(torch.ones(4), 5, torch.zeros(4, dtype=torch.long)), "k=5 exceeds .* M=4"),
        (lambda: grs.accept_best_of_n(torch.ones(0)), "empty"),
        (lambda: grs.accept_best_of_n(torch.tensor([1.0, float("nan")])), "non-finite .* index 1"),
        (lambda: grs.GRSConfig(rule="nope"), "unknown GRS rule 'nope'"),
        (lambda: grs.reshaped_reward_top_k(torch.ones(1), 3, 4), "k=4, m=3"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("m", [1, 4, 7])
def test_contiguous_groups_take_the_row_path_with_the_same_decisions(m):
    """The round loop's groups (arange(G*M) // M) are ranked row by row; relabelling the groups so
    they are no longer increasing forces the general sort: both give the same ranks, ties included."""
    from pgraft.core.grs import GRSConfig, accept, block_size, rank_within_groups

    g = torch.arange(60 * m) // m
    relabelled = (59 - g) * 3  # same partition, decreasing ids
    assert block_size(g) == m and block_size(relabelled) is None
    r = torch.round(torch.randn(60 * m, generator=torch.Generator().manual_seed(0)))  # many ties
    for seed in range(3):
        fast = rank_within_groups(r, g, torch.Generator().manual_seed(seed))
        general = rank_within_groups(r, relabelled, torch.Generator().manual_seed(seed))
        assert torch.equal(fast, general)
        for rule in ("rs", "bon", "topk"):
            cfg = GRSConfig(rule=rule, k=min(2, m))
            assert torch.equal(accept(r, g, cfg, torch.Generator().manual_seed(seed)),
                               accept(r, relabelled, cfg, torch.Generator().manual_seed(seed)))
