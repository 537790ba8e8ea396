"""Rejection sampling is exact with a bound known before sampling, and biased with the batch maximum.

Exact RS (``GRSConfig(rule="rs", bound=B)``) accepts x with probability exp((r - B)/α), so the
accepted law is the tilt p̄ e^{r/α} / Z whatever the round size. The batch-max bound (no ``bound``)
always keeps the round's best candidate: P(accept | r) = E[min(1, e^{(r - M')/α})], M' the max of the
n - 1 others, and the accepted mean falls below the tilt's (the audit: r ~ N(0, 1), α = 0.5, 256
candidates, 1.72 against 2.00). Each check compares a pooled accepted mean over seeded rounds with a
closed form or a quadrature, within 4 standard errors of the simulation (delta method over rounds).
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pgraft.core import grs
from pgraft.core.errors import FieldError
from pgraft.core.trainer import GraftConfig

SIZES = (64, 128, 256)
ALPHAS = (0.25, 0.5, 1.0)
ROUNDS = 1000


def accepted_mean(draw, n: int, cfg: grs.GRSConfig, rounds: int, seed: int) -> tuple[float, float, int]:
    """(pooled mean of the accepted rewards, its standard error, accepted count) over ``rounds``
    rounds of ``n`` candidates, each round accepted by the rule on its own (as the round loop does)."""
    gen = torch.Generator().manual_seed(seed)
    sums, counts = torch.zeros(rounds, dtype=torch.float64), torch.zeros(rounds, dtype=torch.float64)
    for i in range(rounds):
        r = draw(n, gen)
        a = grs.accept(r, None, cfg, gen)
        sums[i], counts[i] = r.double()[a].sum(), a.sum()
    mean = float(sums.sum() / counts.sum())
    se = float(torch.sqrt(((sums - mean * counts) ** 2).sum()) / counts.sum())  # ratio estimator, over rounds
    return mean, se, int(counts.sum())


def uniform(n, gen):
    return torch.rand(n, generator=gen, dtype=torch.float64)


def tilt_mean_uniform(alpha: float) -> float:
    """Mean of the density ∝ e^{u/α} on [0, 1]."""
    lam = 1 / alpha
    return 1 / (1 - math.exp(-lam)) - 1 / lam


CENSOR = 2.0


def censored_normal(n, gen):
    return torch.randn(n, generator=gen, dtype=torch.float64).clamp(max=CENSOR)


def tilt_mean_censored(alpha: float, b: float = CENSOR) -> float:
    """Mean of the tilt e^{r/α} of r = min(z, b), z ~ N(0, 1): e^{λz} φ(z) = e^{λ²/2} φ(z - λ) below b,
    and the atom P(z >= b) at b."""
    lam = 1 / alpha
    cont = math.exp(lam**2 / 2)
    mass = cont * stats.norm.cdf(b - lam) + math.exp(lam * b) * stats.norm.sf(b)
    first = cont * (lam * stats.norm.cdf(b - lam) - stats.norm.pdf(b - lam)) + b * math.exp(lam * b) * stats.norm.sf(b)
    return first / mass


@functools.lru_cache(maxsize=None)
def batchmax_mean_normal(n: int, alpha: float) -> float:
    """Accepted mean of batch-max RS on n rewards N(0, 1), by quadrature (trapezoid, step 5e-4) of
    P(accept | r) = Φ(r)^(n-1) + e^{r/α} ∫_r^∞ e^{-v/α} d Φ(v)^(n-1)."""
    lam = 1 / alpha
    v = np.linspace(-10.0, 10.0, 40_001)
    density = (n - 1) * stats.norm.cdf(v) ** (n - 2) * stats.norm.pdf(v)  # of M', the max of the others
    f = np.exp(-lam * (v - v[-1])) * density  # scaled by e^{λ v_max} against overflow
    above = np.concatenate([np.cumsum(((f[1:] + f[:-1]) / 2 * np.diff(v))[::-1])[::-1], [0.0]])
    p_accept = stats.norm.cdf(v) ** (n - 1) + np.exp(lam * (v - v[-1])) * above
    w = p_accept * stats.norm.pdf(v)
    return float(np.trapezoid(v * w, v) / np.trapezoid(w, v))


# ----------------------------------------------------------------------------- exact RS
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("law", ["uniform", "censored"])
def test_exact_rs_accepts_the_tilt_at_every_round_size(law, alpha):
    draw, bound, exact = ((uniform, 1.0, tilt_mean_uniform(alpha)) if law == "uniform"
                          else (censored_normal, CENSOR, tilt_mean_censored(alpha)))
    cfg = grs.GRSConfig(rule="rs", alpha=alpha, bound=bound)
    for i, n in enumerate(SIZES):
        mean, se, accepted = accepted_mean(draw, n, cfg, ROUNDS, seed=100 * i + int(alpha * 8))
        assert accepted > 1000 and se < 0.015, (n, accepted, se)  # enough power to see a bias of 0.06
        assert abs(mean - exact) < 4 * se, (law, alpha, n, mean, exact, se)


def test_the_closed_forms_of_the_tilt_agree_with_quadrature():
    for alpha in ALPHAS:
        lam = 1 / alpha
        num = integrate.quad(lambda u: u * math.exp(lam * u), 0, 1)[0]
        assert tilt_mean_uniform(alpha) == pytest.approx(num / integrate.quad(lambda u: math.exp(lam * u), 0, 1)[0])
        cont = integrate.quad(lambda z: math.exp(lam * z) * stats.norm.pdf(z), -12, CENSOR)
        first = integrate.quad(lambda z: z * math.exp(lam * z) * stats.norm.pdf(z), -12, CENSOR)
        atom = math.exp(lam * CENSOR) * stats.norm.sf(CENSOR)
        assert tilt_mean_censored(alpha) == pytest.approx((first[0] + CENSOR * atom) / (cont[0] + atom), rel=1e-7)


# ----------------------------------------------------------------------------- batch max: the audit's bias
AUDIT = {(256, 0.5): 1.72, (256, 0.25): 2.40, (64, 0.5): 1.52}  # quadrature, 2 decimals


@pytest.mark.parametrize("n, alpha", sorted(AUDIT))
def test_batch_max_rs_is_biased_below_the_tilt(n, alpha):
    """r ~ N(0, 1): the exact tilt is N(1/α, 1), mean 1/α; batch max keeps less of the top."""
    law = batchmax_mean_normal(n, alpha)
    assert law == pytest.approx(AUDIT[n, alpha], abs=0.005)
    cfg = grs.GRSConfig(rule="rs", alpha=alpha)  # no bound: the batch maximum
    mean, se, accepted = accepted_mean(lambda k, g: torch.randn(k, generator=g, dtype=torch.float64), n, cfg,
                                       2000, seed=n + int(alpha * 8))
    assert abs(mean - law) < 4 * se, (mean, law, se)
    assert 1 / alpha - mean > 10 * se  # measurably below the tilt's mean 1/α
    if alpha == 0.25:
        assert 1 / alpha - mean > 1.5  # 2.40 against 4.00


def test_batch_max_reshaped_reward_gives_the_simulated_law():
    """grs.reshaped_reward_rejection_batchmax on a reference sample of p̄ = N(0, 1) reproduces the
    quadrature's accepted mean, and its acceptance probabilities the simulated rates by reward bin."""
    gen = torch.Generator().manual_seed(7)
    ref = torch.randn(200_000, generator=gen, dtype=torch.float64)
    for n, alpha in sorted(AUDIT):
        w = torch.exp(grs.reshaped_reward_rejection_batchmax(ref, alpha, n) / alpha)
        assert float((ref * w).sum() / w.sum()) == pytest.approx(batchmax_mean_normal(n, alpha), abs=0.02)
    n, alpha = 64, 0.5
    r = torch.randn(n * 4000, generator=gen, dtype=torch.float64).view(-1, n)
    acc = torch.stack([grs.accept_rejection(row, alpha, None, gen) for row in r])
    for lo in (0.0, 1.0, 2.0, 2.5):
        inside = (r >= lo) & (r < lo + 0.25)
        rate = acc[inside].double().mean().item()
        p = torch.exp(grs.reshaped_reward_rejection_batchmax(torch.tensor([lo + 0.125]), alpha, n, ref) / alpha).item()
        se = math.sqrt(p * (1 - p) / int(inside.sum()))
        assert abs(rate - p) < 4 * se + 0.01, (lo, rate, p)  # + the bin's width effect
    assert torch.equal(grs.reshaped_reward_rejection_batchmax(torch.tensor([0.3, -1.0]), alpha, 1),
                       torch.zeros(2, dtype=torch.float64))  # alone in its round: always kept


def test_with_a_bound_the_reshaped_reward_is_r_and_acceptance_is_exp_of_r_minus_bound():
    r = torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    cfg = grs.GRSConfig(rule="rs", alpha=0.5, bound=1.0)
    assert torch.equal(grs.reshaped_reward(r, cfg, 4), r)
    gen = torch.Generator().manual_seed(0)
    rates = grs.accept(r.repeat(20_000), None, cfg, gen).view(20_000, 4).double().mean(0)  # independent decisions
    expected = torch.exp((r - 1.0) / 0.5)
    assert torch.allclose(rates, expected, atol=4 * math.sqrt(0.25 / 20_000))
    assert rates[-1] == 1.0  # r = bound: always accepted, not an error


# ----------------------------------------------------------------------------- refusals and compatibility
def test_a_reward_above_the_bound_is_refused_naming_the_bound_and_the_max():
    cfg = grs.GRSConfig(rule="rs", alpha=1.0, bound=1.0)
    with pytest.raises(FieldError) as info:
        grs.accept(torch.tensor([0.2, 1.25, 0.9, 1.5]), None, cfg, torch.Generator().manual_seed(0))
    err = info.value
    assert err.field == "bound" and "1.5" in err.detail and "bound 1" in err.detail and "2 of 4" in err.detail
    assert "\n" not in str(err)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1", True])
def test_a_bound_that_is_not_a_finite_number_is_refused(bad):
    with pytest.raises(FieldError, match="finite number"):
        grs.GRSConfig(rule="rs", bound=bad)


OLD_GRS = {"rule": "rs", "alpha": 0.5, "k": 1, "threshold": 0.0}  # a run's config.json before `bound`


def test_an_old_run_config_without_bound_loads_and_decides_as_before():
    old = {"rounds": 2, "groups": 4, "group_size": 8, "grs": dict(OLD_GRS), "split": 0.0}
    cfg = GraftConfig.from_dict(json.loads(json.dumps(old)))
    assert cfg.grs.bound is None and cfg.grs.rule == "rs"
    r = torch.randn(256, generator=torch.Generator().manual_seed(1))
    new = grs.accept(r, None, cfg.grs, torch.Generator().manual_seed(2))
    legacy = grs.accept_rejection(r, 0.5, None, torch.Generator().manual_seed(2))  # the batch-max rule
    assert torch.equal(new, legacy) and bool(new[r.argmax()])


def test_resuming_an_old_run_sees_no_change_but_a_new_bound_is_refused(tmp_path):
    from dataclasses import asdict

    from pgraft.core.errors import UsageError
    from pgraft.core.rundir import RunDir

    saved = {"graft": {**asdict(GraftConfig()), "grs": dict(OLD_GRS)}, "app": {}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run = RunDir(tmp_path, resume=True)
    same = GraftConfig(grs=grs.GRSConfig(**OLD_GRS))
    run.save_config({"graft": asdict(same), "app": {}}, resume=True)  # bound None == absent: no refusal
    bounded = GraftConfig(grs=grs.GRSConfig(**OLD_GRS, bound=1.0))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="grs.bound: saved None, now 1.0"):
        run.save_config({"graft": asdict(bounded), "app": {}}, resume=True)


def test_reward_max_flag_maps_to_the_bound_for_rs_only():
    import typer

    from pgraft.core.cli import graft_config

    base = dict(rounds=1, groups=4, m=8, alpha=1.0, k=1, threshold=0.0, dedup=False, t=0.0, train_steps=1,
                batch_size=4, lr=1e-3, lora=0, replay=False, seed=0)
    assert graft_config(rule="rs", reward_max=1.0, **base).grs.bound == 1.0
    assert graft_config(rule="rs", reward_max=math.inf, **base).grs.bound is None  # inf: no bound, batch max
    assert graft_config(rule="rs", **base).grs.bound is None
    assert graft_config(rule="topk", reward_max=1.0, **base).grs.bound is None  # other rules ignore it
    with pytest.raises(typer.BadParameter):
        graft_config(rule="rs", reward_max=math.nan, **base)


def test_declared_reward_bounds_hold_on_extreme_inputs():
    """The apps' declared bounds (the default --reward-max of --rule rs) are true bounds."""
    from pgraft.apps.layout.rewards import REWARD_MAX as LAYOUT_MAX
    from pgraft.apps.layout.rewards import REWARDS as LAYOUT
    from pgraft.apps.toy.rewards import REWARD_MAX as TOY_MAX
    from pgraft.apps.toy.rewards import REWARDS as TOY

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 2, generator=gen) * 5
    for name, bound in TOY_MAX.items():
        assert float(TOY[name](x).max()) <= bound
    assert "x" not in TOY_MAX  # unbounded: no default
    state = {"boxes": torch.randn(512, 10, 4, generator=gen) * 3, "classes": torch.zeros(512, 10, dtype=torch.long),
             "mask": torch.rand(512, 10, generator=gen) < 0.7}
    for name, reward in LAYOUT.items():
        assert float(reward(state).max()) <= LAYOUT_MAX[name]


TINY = ("--rounds", "1", "--groups", "4", "--m", "2", "--train-steps", "1", "--batch-size", "4", "--quiet")


@pytest.mark.slow
def test_toy_train_refuses_a_reward_above_reward_max_and_records_the_declared_bound(tmp_path):
    """CLI: --reward-max below the rewards stops the run in one line naming the flag and the max; the
    ring reward's declared bound (0) is the default of --rule rs and lands in config.json."""
    from clitools import invoke, ok

    result, output = invoke("toy", "train", "--rule", "rs", "--reward", "x", "--reward-max", "-5", "--out",
                            str(tmp_path / "x"), *TINY)
    assert result.exit_code == 2 and "Invalid value for --reward-max:" in output, output
    assert "exceeds the declared bound -5" in output and "largest reward of this batch" in output
    assert "Traceback" not in output
    ok("toy", "train", "--rule", "rs", "--reward", "ring", "--out", str(tmp_path / "ring"), *TINY)
    saved = json.loads((tmp_path / "ring" / "config.json").read_text())["graft"]["grs"]
    assert saved["bound"] == 0.0 and saved["rule"] == "rs"
