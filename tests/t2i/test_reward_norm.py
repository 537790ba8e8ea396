"""Multi-reward normalisation: --reward-norm zscore-round standardises each component over the whole
round (whatever the scoring chunk size), rank accepts on the weighted rank sum of the components
within each GRS group; both reach the selection through the round loop's combine hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgraft.apps.t2i.reward_spec import (
    NORMS,
    CombinedReward,
    RewardComponent,
    build_reward,
    combine_components,
    group_ranks,
)
from pgraft.core.errors import UsageError
from pgraft.core.grs import GRSConfig, accept_top_k
from pgraft.core.trainer import GraftConfig, GraftProblem, Scores, sample_candidates


def _pop_z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std(unbiased=False)


def _two_components(norm: str) -> CombinedReward:
    """a(x) = x, b(x) = x^2 on 1-D states (the "images"), weights 2 and -0.5."""
    return CombinedReward([RewardComponent("a", "a", 2.0, lambda x, p: x[:, 0].double()),
                           RewardComponent("b", "b", -0.5, lambda x, p: x[:, 0].double() ** 2)], norm)


# ----------------------------------------------------------------------------- pure functions
def test_group_ranks_by_hand():
    x = torch.tensor([0.9, 0.1, 0.5, 0.7, 3.0, 3.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    # group 0: ranks 3, 0, 1, 2 of 4 -> /3; group 1: ties share (1 + 2) / 2 -> 1.5 / 2; group 2: alone -> 1/2
    expected = torch.tensor([1, 0, 1 / 3, 2 / 3, 0.75, 0.75, 0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(group_ranks(x, groups), expected)


def test_rank_sum_acceptance_by_hand():
    a = torch.tensor([0.9, 0.1, 0.5, 0.7, 1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([1.0, 40.0, 30.0, 2.0, 4.0, 3.0, 2.0, 1.0])
    groups = torch.arange(8) // 4
    total = combine_components({"a": a, "b": b}, {"a": 2.0, "b": 1.0}, "rank", groups)
    # group 0: a ranks [1, 0, 1/3, 2/3], b ranks [0, 1, 2/3, 1/3] -> 2a + b = [2, 1, 4/3, 5/3]
    # group 1: a ranks [0, 1/3, 2/3, 1], b ranks [1, 2/3, 1/3, 0] -> [1, 4/3, 5/3, 2]
    expected = torch.tensor([2, 1, 4 / 3, 5 / 3, 1, 4 / 3, 5 / 3, 2], dtype=torch.float64)
    torch.testing.assert_close(total, expected)
    accepted = accept_top_k(total, 2, groups, torch.Generator().manual_seed(0))
    assert accepted.nonzero().flatten().tolist() == [0, 3, 6, 7]
    # raw: group 0 is [2.8, 40.2, 31, 3.4] (b's scale dominates), group 1 [6, 7, 8, 9]
    raw = combine_components({"a": a, "b": b}, {"a": 2.0, "b": 1.0}, "raw", groups)
    assert accept_top_k(raw, 2, groups, torch.Generator().manual_seed(0)).nonzero().flatten().tolist() == [1, 2, 6, 7]


def test_zscore_round_and_direct_calls():
    x = torch.randn(9, 1, generator=torch.Generator().manual_seed(0))
    reward = _two_components("zscore-round")
    expected = 2 * _pop_z(x[:, 0].double()) - 0.5 * _pop_z(x[:, 0].double() ** 2)
    torch.testing.assert_close(reward(x, [""] * 9), expected)  # a direct call is one round
    total, metrics, comps = reward.chunk(x, [""] * 9)
    torch.testing.assert_close(total, expected)
    assert metrics["reward_a_mean"] == pytest.approx(float(x.mean()))
    torch.testing.assert_close(comps["b"], x[:, 0].double() ** 2)
    assert reward.round_combine is not None and _two_components("zscore").round_combine is None
    assert _two_components("raw").chunk(x, [""] * 9)[2] is None
    with pytest.raises(UsageError, match="zscore-round normalises over the whole round") as err:
        reward.with_metrics(x, [""] * 9)
    assert "\n" not in str(err.value)
    assert set(NORMS) == {"raw", "zscore", "zscore-round", "rank"}
    single = build_reward("checker", norm="rank")  # one named reward, rank over the call
    assert isinstance(single, CombinedReward) and single.norm == "rank"


# ----------------------------------------------------------------------------- through the round loop
class _Drift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def _step(model, x, t, t_next, cond=None, generator=None):
    return x + torch.randn(x.shape, generator=generator)


def _problem(reward: CombinedReward) -> GraftProblem:
    def score(x0, cond):  # what an app's scorer does with CombinedReward.chunk
        total, metrics, comps = reward.chunk(x0, [""] * len(x0))
        return Scores(total, None, None, metrics, comps)

    return GraftProblem(prior=lambda n, g: torch.zeros(n, 1), times=torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
                        step=_step, loss=lambda *a: None, score=score, combine=reward.round_combine)


@pytest.mark.parametrize("chunk", [3, 7, 40])
def test_round_zscore_is_the_formula_over_the_round_whatever_the_chunk(chunk):
    cfg = GraftConfig(rounds=1, groups=8, group_size=5, grs=GRSConfig(rule="topk", k=2), split=0.0,
                      sample_batch_size=chunk, seed=4)
    cands = sample_candidates(_problem(_two_components("zscore-round")), _Drift(), _Drift(), cfg, 0,
                              show_progress=False)
    a = cands.components["a"]
    assert a.shape == (40,)
    torch.testing.assert_close(cands.rewards, 2 * _pop_z(a) - 0.5 * _pop_z(a ** 2))
    assert cands.rewards.mean().item() == pytest.approx(0.0, abs=1e-12)
    # each component's mean over the round is logged (metrics.csv: the size-weighted chunk means)
    assert cands.extra_metrics["reward_a_mean"] == pytest.approx(a.mean().item())
    assert cands.extra_metrics["reward_b_mean"] == pytest.approx((a ** 2).mean().item())
    per_chunk = sample_candidates(_problem(_two_components("zscore")), _Drift(), _Drift(), cfg, 0,
                                  show_progress=False)
    assert per_chunk.components is None  # zscore is final per chunk: nothing for the round hook
    if chunk < 40:  # the old per-chunk z-score is not the round's
        assert not torch.allclose(per_chunk.rewards, cands.rewards)
    else:
        torch.testing.assert_close(per_chunk.rewards, cands.rewards)


def test_rank_norm_selects_on_rank_sums_within_groups():
    cfg = GraftConfig(rounds=1, groups=4, group_size=6, grs=GRSConfig(rule="topk", k=2), split=0.0,
                      sample_batch_size=5, seed=1)
    cands = sample_candidates(_problem(_two_components("rank")), _Drift(), _Drift(), cfg, 0, show_progress=False)
    a = cands.components["a"]
    expected = 2 * group_ranks(a, cands.groups) - 0.5 * group_ranks(a ** 2, cands.groups)
    torch.testing.assert_close(cands.rewards, expected)
    for g in range(4):  # ranks of a group are a permutation of 0, 1/5, ..., 1 (no ties in continuous draws)
        r = group_ranks(a, cands.groups)[cands.groups == g]
        torch.testing.assert_close(r.sort().values, torch.arange(6, dtype=torch.float64) / 5)
