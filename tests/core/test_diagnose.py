"""core.diagnose against a closed form: a Gaussian random walk on the sampler clock.

X_T = 0 and X_{t_next} = X_t + sqrt(t - t_next) * noise, reward r = X_0. Then X_t ~ N(0, 1 - t) and
r | X_t ~ N(X_t, t): E[Var(r | X_t)] = t, Var(E[r | X_t]) = 1 - t, Var(r) = 1 and R^2(t) = 1 - t.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pgraft.core.diagnose import (
    COLUMNS,
    bootstrap_intervals,
    grid_index,
    parse_grid,
    recommend_t,
    reward_variance,
    run_diagnose,
    variance_components,
)
from pgraft.core.sampling import randn_like
from pgraft.core.schedules import flow_times, split_times
from pgraft.core.state import repeat_interleave
from pgraft.core.trainer import GraftProblem

GRID = (0.1, 0.25, 0.5, 0.75, 0.9)


def walk_step(model, x, t, t_next, cond=None, generator=None):
    return x + math.sqrt(t - t_next) * randn_like(x, generator)


def reset_step(model, x, t, t_next, cond=None, generator=None):
    """Forgets the state at every step: r = X_0 is independent of every X_t before the last step."""
    return randn_like(x, generator)


def walk_problem(step=walk_step, conditions=None) -> GraftProblem:
    def reward(x0, cond):
        offset = torch.zeros(len(x0)) if cond is None else torch.tensor(cond, dtype=torch.float32)
        return x0[:, 0] + offset

    return GraftProblem(prior=lambda n, g: torch.zeros(n, 1), times=flow_times(20), step=step,
                        loss=lambda *args: torch.zeros(()), reward=reward, conditions=conditions)


@pytest.fixture(scope="module")
def walk_table() -> pd.DataFrame:
    return reward_variance(walk_problem(), nn.Linear(1, 1), GRID, n_states=4000, tails=4, seed=0,
                           batch_size=4096, show_progress=False)


def test_state_repeat_interleave_repeats_each_sample_in_a_row():
    x = torch.tensor([[1.0], [2.0]])
    assert repeat_interleave(x, 3)[:, 0].tolist() == [1, 1, 1, 2, 2, 2]
    d = repeat_interleave({"a": torch.tensor([1, 2]), "b": torch.tensor([[1, 1], [2, 2]])}, 2)
    assert d["a"].tolist() == [1, 1, 2, 2] and d["b"].tolist() == [[1, 1], [1, 1], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="positive"):
        repeat_interleave(x, 0)


def test_variance_components_match_the_anova_of_scipy():
    from scipy.stats import f_oneway

    rng = np.random.default_rng(0)
    r = rng.normal(size=(30, 5)) + rng.normal(size=(30, 1))
    est = variance_components(r)
    ref = f_oneway(*r)  # balanced one-way ANOVA, one group per row
    assert est["F"] == pytest.approx(ref.statistic) and est["p_value"] == pytest.approx(ref.pvalue)
    msw = r.var(axis=1, ddof=1).mean()
    msb = 5 * r.mean(axis=1).var(ddof=1)
    assert est["evar"] == pytest.approx(msw)
    assert est["sigma_b2"] == pytest.approx((msb - msw) / 5)
    assert est["r2"] == pytest.approx(est["sigma_b2"] / (est["sigma_b2"] + msw))
    # a state that decides everything: no within-state variance, F infinite, p 0, R^2 1
    exact = variance_components(np.repeat(np.arange(4.0)[:, None], 3, axis=1))
    assert exact["evar"] == 0 and exact["r2"] == 1 and exact["F"] == math.inf and exact["p_value"] == 0
    with pytest.raises(ValueError, match="K >= 2"):
        variance_components(np.zeros((4, 1)))


def test_the_walk_matches_its_closed_form(walk_table):
    table = walk_table
    assert list(table.columns) == COLUMNS and table["t"].tolist() == list(GRID)
    assert table["t_grid"].tolist() == pytest.approx(list(GRID))  # 20 steps: every t is a grid point
    for row in table.itertuples():
        # E[Var(r | X_t)] = t: a within-state variance with ddof 0 would give 0.75 t (K = 4)
        assert row.evar == pytest.approx(row.t, rel=0.05), row
        width = row.evar_hi - row.evar_lo
        assert row.evar_lo - width / 2 <= row.t <= row.evar_hi + width / 2, row
        # R^2 = 1 - t: the variance of the state means without removing MSW / K is off by t (1 - R^2) / K,
        # dropping the 1/K of sigma_b^2 by far more
        assert row.r2 == pytest.approx(1 - row.t, abs=0.03), row
        width = row.r2_hi - row.r2_lo
        assert row.r2_lo - width / 2 <= 1 - row.t <= row.r2_hi + width / 2, row
        assert 0 < row.r2_lo < row.r2 < row.r2_hi < 1 and row.evar_lo < row.evar < row.evar_hi
        assert row.var_r == pytest.approx(1.0, rel=0.08)
        assert row.p_value < 1e-12 and row.n_states == 4000 and row.tails == 4


def test_the_bootstrap_is_seeded_and_its_width_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(400, 4)) + rng.normal(size=(400, 1))
    a = bootstrap_intervals(r, 500, rng=np.random.default_rng(7))
    assert a == bootstrap_intervals(r, 500, rng=np.random.default_rng(7))
    big = np.concatenate([r] + [rng.normal(size=(400, 4)) + rng.normal(size=(400, 1)) for _ in range(3)])
    b = bootstrap_intervals(big, 500, rng=np.random.default_rng(7))
    ratio = (a["r2"][1] - a["r2"][0]) / (b["r2"][1] - b["r2"][0])
    assert 1.5 < ratio < 2.7  # 4x the states: about half the width


def test_conditions_are_diagnosed_within_and_tails_keep_their_state_s_condition():
    # r = X_0 + c with c = -5 / +5: the offset is decided by the condition, not by X_t, and GRS selects within a
    # condition, so R^2 must stay the walk's 1 - t = 0.5 (mixing in the offset's variance 25 would give 25.5 / 26),
    # and a tail with another condition than its state would add ~25 to evar
    table = reward_variance(walk_problem(conditions=[-5.0, 5.0]), nn.Linear(1, 1), (0.5,), n_states=400, tails=4,
                            seed=3, show_progress=False)
    row = table.iloc[0]
    assert row["conditions"] == 100 and list(table.columns) == COLUMNS  # 400 states in blocks of 4
    assert row["evar"] == pytest.approx(0.5, rel=0.15)
    assert row["var_r"] == pytest.approx(1.0, rel=0.15)
    assert row["r2_lo"] < 0.5 < row["r2_hi"] and row["r2"] == pytest.approx(0.5, abs=0.1)


def test_nested_anova_ignores_condition_effects_and_bootstraps_over_conditions():
    rng = np.random.default_rng(0)
    G, s, K = 60, 4, 5
    groups = np.repeat(np.arange(G), s)
    state = rng.normal(size=(G * s, 1))  # Var(E[r | X_t, c] | c) = 1
    r = 10 * rng.normal(size=(G, 1)).repeat(s, axis=0) + state + rng.normal(size=(G * s, K))  # E Var(r | X_t) = 1
    est = variance_components(r, groups)
    assert est["r2"] == pytest.approx(0.5, abs=0.1) and est["evar"] == pytest.approx(1.0, rel=0.1)
    assert variance_components(r)["r2"] > 0.95  # without the conditions the offsets look decided by X_t
    ci = bootstrap_intervals(r, 300, rng=np.random.default_rng(1), groups=groups)
    assert ci == bootstrap_intervals(r, 300, rng=np.random.default_rng(1), groups=groups)
    assert ci["r2"][0] < est["r2"] < ci["r2"][1] and ci["r2"][1] - ci["r2"][0] < 0.4
    # one condition: the one-way design, bit for bit
    assert variance_components(r, np.zeros(G * s)) == variance_components(r)
    with pytest.raises(ValueError, match="2 or more states"):
        variance_components(r[:3], np.arange(3))


def test_no_information_in_x_t_gives_calibrated_p_values():
    problem = walk_problem(step=reset_step)
    table = reward_variance(problem, nn.Linear(1, 1), GRID, n_states=200, tails=4, seed=0, show_progress=False)
    assert (table["p_value"] > 0.01).all(), table
    assert (table["r2_lo"] < 0.05).all() and table["evar"].tolist() == pytest.approx([1.0] * 5, rel=0.15)
    # under H0 the p-values are uniform: 40 independent small diagnoses
    ps = [reward_variance(problem, nn.Linear(1, 1), (0.5,), n_states=20, tails=3, seed=s, show_progress=False,
                          n_boot=10)["p_value"].item() for s in range(40)]
    assert 0.3 < np.mean(ps) < 0.7 and sum(p < 0.05 for p in ps) <= 8


def test_grid_index_is_trains_split_and_t_one_is_x_T():
    times = flow_times(40)
    for t in (0.1, 0.25, 0.33, 0.9):
        assert grid_index(times, t) == split_times(times, t).index
    assert grid_index(times, 1.0) == 0
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            grid_index(times, bad)


@pytest.mark.parametrize("text", ["", "0.1,,0.5", "a,0.5", "0.5,0", "1.2", "nan"])
def test_parse_grid_refuses_bad_values(text):
    with pytest.raises(ValueError):
        parse_grid(text)


def test_parse_grid_reads_a_comma_list():
    assert parse_grid(" 0.1, 0.25,1") == [0.1, 0.25, 1.0]


def _table(r2_lo: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"t": [0.1, 0.25, 0.5, 0.75, 0.9], "r2_lo": r2_lo})


def test_recommend_t_picks_the_largest_t_that_keeps_half_the_gain():
    t, reason = recommend_t(_table([0.9, 0.7, 0.55, 0.49, 0.2]))
    assert t == 0.5 and "0.550" in reason
    assert recommend_t(_table([0.9, 0.7, 0.55, 0.49, 0.2]), keep=0.6)[0] == 0.25
    # not monotone: still the largest qualifying t
    assert recommend_t(_table([0.9, 0.3, 0.6, 0.2, float("nan")]))[0] == 0.5
    # shuffled rows
    assert recommend_t(_table([0.9, 0.7, 0.55, 0.49, 0.2]).iloc[::-1])[0] == 0.5


def test_recommend_t_falls_back_to_the_smallest_t():
    t, reason = recommend_t(_table([0.4, 0.3, 0.2, 0.1, float("nan")]))
    assert t == 0.1 and "no t on the grid" in reason and "r2_lo=0.400" in reason


def test_run_diagnose_prints_and_writes(tmp_path, capsys):
    table = run_diagnose(walk_problem(), nn.Linear(1, 1), (0.25, 0.75), n_states=300, tails=3, seed=0,
                         out_dir=tmp_path, show_progress=False, device="cpu")
    out = capsys.readouterr().out
    assert "recommended t: 0.25 (" in out and "r2_lo" in out
    assert (tmp_path / "diagnose.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "diagnose.csv")["r2"].tolist() == pytest.approx(table["r2"].tolist())
