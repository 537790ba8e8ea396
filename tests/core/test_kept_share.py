"""The kept share of diagnose: Cov(h, A) / Cov(r, A), h = E[r | X_t], by simulating the GRS rule on a
states × tails table (core.diagnose.kept_share, the function `pgraft <app> diagnose` calls).

R²(t) is the share of GRAFT's gain that P-GRAFT keeps only where E[h | r] is linear in r. Two cases:

- linear-Gaussian: h ~ N(0, s²), e ~ N(0, 1 - s²), r = h + e: E[h | r] = s² r, so the kept share is
  s² = R² for every rule;
- the counter-example: h = ±1 equiprobable, e ~ N(0, 0.9²): R² = 1/1.81 = 0.552, but E[h | r] =
  tanh(r / 0.81) flattens at the top and Best-of-N keeps Cov(tanh(r/0.81), F^(N-1)) / Cov(r, F^(N-1))
  = 0.434 (N = 16) and 0.385 (N = 32) of the gain (quadrature below).

Tolerances: the estimate's spread over independent tables of 20000 states × 8 tails with 8192
simulated groups is 0.0038 (N = 16) and 0.0033 (N = 32) (8 seeds); the checks allow 4 of those.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from clitools import ok
from scipy import integrate, stats

from pgraft.core.diagnose import kept_share, kept_share_interval, recommend_t, variance_components
from pgraft.core.grs import GRSConfig

SIGMA = 0.9


def two_point_table(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.choice([-1.0, 1.0], n)
    return h[:, None] + SIGMA * rng.standard_normal((n, k))


def gaussian_table(n: int, k: int, s2: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = math.sqrt(s2) * rng.standard_normal(n)
    return h[:, None] + math.sqrt(1 - s2) * rng.standard_normal((n, k))


def best_of_n_kept_two_point(n: int) -> float:
    """Cov(E[h | r], A) / Cov(r, A) for Best-of-n, P(A | r) = F(r)^(n-1), by quadrature (E[h] = E[r] = 0)."""
    s2 = SIGMA**2

    def f(r):
        return 0.5 * (stats.norm.pdf(r - 1, scale=SIGMA) + stats.norm.pdf(r + 1, scale=SIGMA))

    def cdf(r):
        return 0.5 * (stats.norm.cdf(r - 1, scale=SIGMA) + stats.norm.cdf(r + 1, scale=SIGMA))

    cov_h = integrate.quad(lambda r: math.tanh(r / s2) * cdf(r) ** (n - 1) * f(r), -9, 9, limit=200)[0]
    cov_r = integrate.quad(lambda r: r * cdf(r) ** (n - 1) * f(r), -9, 9, limit=200)[0]
    return cov_h / cov_r


@pytest.mark.parametrize("n, expected", [(16, 0.43), (32, 0.38)])
def test_the_counter_example_keeps_less_than_r2(n, expected):
    exact = best_of_n_kept_two_point(n)
    assert exact == pytest.approx(expected, abs=0.005)
    r = two_point_table(20_000, 8, seed=n)
    r2 = variance_components(r)["r2"]
    assert r2 == pytest.approx(1 / (1 + SIGMA**2), abs=0.01)
    kept = kept_share(r, GRSConfig(rule="bon"), n, n_groups=8192, generator=torch.Generator().manual_seed(n))
    assert kept == pytest.approx(exact, abs=0.015)
    assert r2 - kept > 0.1  # R² overstates what P-GRAFT keeps


@pytest.mark.parametrize("s2", [0.3, 0.7])
@pytest.mark.parametrize("rule, m, rounds", [
    (GRSConfig(rule="bon"), 16, None),
    (GRSConfig(rule="topk", k=3), 8, None),
    (GRSConfig(rule="threshold", threshold=1.0), 8, None),
    (GRSConfig(rule="rs", alpha=0.5), 8, 32),  # batch max over rounds of 32 groups
    ("exact-rs", 8, None),  # bound: the table's maximum, a true bound of the simulated law (α = 2)
])
def test_linear_gaussian_keeps_r2_for_every_rule(rule, m, rounds, s2):
    r = gaussian_table(20_000, 8, s2, seed=int(s2 * 10) + m)
    if rule == "exact-rs":
        rule = GRSConfig(rule="rs", alpha=2.0, bound=float(r.max()))  # α = 2: ~10% accepted, not ~1%
    kept = kept_share(r, rule, m, round_groups=rounds, n_groups=8192, generator=torch.Generator().manual_seed(3))
    assert kept == pytest.approx(s2, abs=0.04), (rule, kept)


def test_conditions_are_selected_within():
    """r = 10 c + h + e with a condition effect c per block of 64 states: selection within a condition
    keeps s² (0.5); pooling the conditions would credit X_t with the condition's share."""
    rng = np.random.default_rng(0)
    blocks = np.arange(6400) // 64
    r = gaussian_table(6400, 8, 0.5, seed=1) + 10 * rng.standard_normal(100)[blocks][:, None]
    rule = GRSConfig(rule="topk", k=2)
    within = kept_share(r, rule, 8, groups=blocks, n_groups=8192, generator=torch.Generator().manual_seed(0))
    pooled = kept_share(r, rule, 8, n_groups=8192, generator=torch.Generator().manual_seed(0))
    assert within == pytest.approx(0.5, abs=0.06)
    assert pooled > 0.95


def test_the_interval_covers_the_estimate_and_shrinks_with_more_states():
    rule = GRSConfig(rule="bon")
    widths = []
    for n in (200, 3200):
        r = two_point_table(n, 8, seed=n)
        gen = torch.Generator().manual_seed(0)
        point = kept_share(r, rule, 8, generator=gen)
        lo, hi = kept_share_interval(r, rule, 8, n_boot=100, n_groups=1024, generator=gen)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # 16x the states: about a quarter of the width, at least half


def test_not_estimable_gives_nan():
    """A state used by every tail of a group leaves no tail for h: blocks of 2 states, 2 tails, M = 8."""
    r = two_point_table(40, 2, seed=0)
    assert math.isnan(kept_share(r, GRSConfig(rule="bon"), 8, groups=np.arange(40) // 2))
    assert math.isnan(kept_share(r, GRSConfig(rule="threshold", threshold=100.0), 8))  # accepts nothing


def test_recommend_t_uses_the_kept_share_lower_bound_when_there_is_one():
    table = pd.DataFrame({"t": [0.1, 0.25, 0.5], "r2": [0.9, 0.7, 0.6], "r2_lo": [0.85, 0.65, 0.55],
                          "kept_lo": [0.8, 0.55, 0.4]})
    t, reason = recommend_t(table, rule="bon N=16")
    assert t == 0.25 and "kept-share lower 95% bound 0.550" in reason and "bon N=16" in reason
    assert "perfectly" in reason and "one round" in reason and "r alone" in reason
    t, reason = recommend_t(table.assign(kept_lo=math.nan))  # none estimable: R²'s bound, said to be linear-only
    assert t == 0.5 and "linear" in reason


def test_toy_diagnose_documents_and_writes_the_kept_share(tmp_path):
    help_text = ok("toy", "diagnose", "--help")
    for text in ("kept share", "--rule", "--m", "--reward-max", "perfect learning", "one round"):
        assert text in help_text, text
    output = ok("toy", "diagnose", "--states", "64", "--tails", "4", "--t", "0.5", "--rule", "bon", "--m", "4",
                "--out", str(tmp_path), "--quiet")
    assert "kept = share of GRAFT's per-round gain" in output and "bon N=4" in output
    table = pd.read_csv(tmp_path / "diagnose.csv")
    row = table.iloc[0]
    assert {"kept", "kept_lo", "kept_hi"} <= set(table.columns)
    assert row["kept_lo"] <= row["kept"] <= row["kept_hi"] and 0 < row["kept"] < 1.2
