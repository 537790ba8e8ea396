"""The budget-aware recommendation of ``pgraft <app> diagnose --train-steps N``
(core.diagnose.learning_probe / predict_gains / recommend_budget_t).

The synthetic world: a Brownian walk with a learnable drift b over flow times 1 -> 0,
X_0 = b + W_1, reward r = X_0. With b = 0: X_t ~ N(0, 1 - t), h(X_t) = E[r | X_t] = X_t, and
Best-of-8 on r selects the max of 8 standard normals, so GRAFT's one-round gain is
E[max of 8 N(0, 1)] = 1.4236 and, (h, r) being jointly Gaussian, P-GRAFT's target gain at t is
R²(t) × 1.4236 = (1 - t) × 1.4236 (the breeder's equation of the module docstring). The head's
loss at split t is (X_t - b (1 - t))², minimised by the accepted X_t's mean: a converged head
realises its whole target shift (progress 1)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from pgraft.core.diagnose import learning_probe, predict_gains, recommend_budget_t
from pgraft.core.grs import GRSConfig
from pgraft.core.sampling import randn_like
from pgraft.core.schedules import flow_times
from pgraft.core.trainer import GraftConfig, GraftProblem

BON8_GAIN = 1.4236  # E[max of 8 iid N(0, 1)]


class Drift(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1))


def drift_step(model, x, t, t_next, cond=None, generator=None):
    dt = float(t) - float(t_next)
    return x + model.b * dt + math.sqrt(dt) * randn_like(x, generator)


def drift_loss(model, x_start, t_start, cond, generator):
    return ((x_start[:, 0] - model.b * (1.0 - float(t_start))) ** 2).mean()


def drift_problem() -> GraftProblem:
    return GraftProblem(prior=lambda n, g: torch.zeros(n, 1), times=flow_times(20), step=drift_step,
                        loss=drift_loss, reward=lambda x0, cond: x0[:, 0])


def bon8(steps: int) -> GraftConfig:
    return GraftConfig(groups=1000, group_size=8, grs=GRSConfig(rule="bon"), train_steps=steps, batch_size=256,
                       lr=0.05)


def probe(t: float, steps: int, seed: int = 0) -> dict:
    with torch.no_grad():
        base = Drift().requires_grad_(False)
    return learning_probe(drift_problem(), base, bon8(steps), t, n_eval=2000, seed=seed, batch_size=1000)


def test_no_steps_no_shift():
    """A head not trained is the base: the paired evaluation sees the same samples, shift 0 exactly."""
    row = probe(0.5, 0)
    assert row["realized_shift"] == 0.0 and row["progress"] == 0.0
    assert row["candidates"] == 8000 and row["accepted"] == 1000


@pytest.mark.parametrize("t", [0.0, 0.5])
def test_target_shift_is_the_breeders_equation(t):
    """target_shift = (1 - t) × E[max of 8 N(0,1)]: GRAFT's gain at t = 0, R²(t) times it at t > 0."""
    row = probe(t, 0)
    assert row["target_shift"] == pytest.approx((1 - t) * BON8_GAIN, abs=0.07)


@pytest.mark.parametrize("t", [0.0, 0.5])
def test_converged_head_reaches_its_target(t):
    """With enough steps the drift head realises its target shift (progress ≈ 1); after 2 steps of
    lr 0.05 it cannot have (b moves about lr per Adam step: progress well below 1)."""
    short, long = probe(t, 2), probe(t, 300)
    assert 0 < short["progress"] < 0.25
    assert long["progress"] == pytest.approx(1.0, abs=0.1)


def test_probe_is_seeded():
    a, b, c = (probe(0.5, 5, seed=s) for s in (3, 3, 4))
    for row in (a, b, c):
        row.pop("seconds")
    assert a == b
    assert a["target_shift"] != c["target_shift"] and a["realized_shift"] != c["realized_shift"]


def _probe_table(progress: dict[float, float], g0: float = 2.0) -> pd.DataFrame:
    return pd.DataFrame([{"t": t, "train_steps": 10, "candidates": 64, "accepted": 8,
                          "target_shift": g0 if t == 0 else math.nan, "realized_shift": math.nan,
                          "progress": p, "seconds": 0.0} for t, p in progress.items()])


def _diagnosis(kept: dict[float, float]) -> pd.DataFrame:
    return pd.DataFrame([{"t": t, "kept": k, "kept_lo": k - 0.1, "kept_hi": k + 0.1, "r2": 0.0, "r2_lo": 0.0,
                          "r2_hi": 0.0} for t, k in kept.items()])


def test_predicted_gain_is_g0_kept_progress():
    pred = predict_gains(_probe_table({0.0: 0.5, 0.25: 0.8, 0.5: 1.0}), _diagnosis({0.25: 0.9, 0.5: 0.6}))
    assert pred["predicted_gain"].tolist() == pytest.approx([2 * 1 * 0.5, 2 * 0.9 * 0.8, 2 * 0.6 * 1.0])
    assert pred["predicted_lo"].tolist() == pytest.approx([1.0, 2 * 0.8 * 0.8, 2 * 0.5 * 1.0])
    assert pred["kept"].iloc[0] == 1.0


def test_predicted_gain_falls_back_to_r2_then_to_the_probe():
    table = _diagnosis({0.5: math.nan})
    table.loc[0, ["r2", "r2_lo", "r2_hi"]] = [0.4, 0.3, 0.5]
    probe_rows = _probe_table({0.0: 1.0, 0.5: 1.0, 0.75: 1.0})
    probe_rows.loc[probe_rows["t"] == 0.75, "target_shift"] = 0.5  # no diagnosis row: the probe's own share
    pred = predict_gains(probe_rows, table)
    assert pred["kept"].tolist() == pytest.approx([1.0, 0.4, 0.25])


def test_learning_limited_budget_prefers_t_above_zero():
    """t = 0 barely moves in N steps while t = 0.5 gets most of its way: t = 0.5 is recommended;
    with equal progress everywhere the kept share decides and t = 0 wins."""
    kept = _diagnosis({0.25: 0.9, 0.5: 0.7})
    t, reason = recommend_budget_t(predict_gains(_probe_table({0.0: 0.1, 0.25: 0.3, 0.5: 0.6}), kept))
    assert t == 0.5 and "0.7" in reason
    t, _ = recommend_budget_t(predict_gains(_probe_table({0.0: 0.6, 0.25: 0.6, 0.5: 0.6}), kept))
    assert t == 0.0


def test_ties_and_no_gain_go_to_graft():
    kept = _diagnosis({0.5: 0.5})
    t, _ = recommend_budget_t(predict_gains(_probe_table({0.0: 0.5, 0.5: 1.0}), kept))
    assert t == 0.0  # 2 × 1 × 0.5 == 2 × 0.5 × 1.0: the smaller t
    t, reason = recommend_budget_t(predict_gains(_probe_table({0.0: -0.2, 0.5: 0.0}), kept))
    assert t == 0.0 and "no t is predicted" in reason


def test_predict_gains_needs_graft_row():
    with pytest.raises(ValueError, match="t = 0"):
        predict_gains(_probe_table({0.5: 1.0}))
