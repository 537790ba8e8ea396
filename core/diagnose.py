"""Where to split P-GRAFT, from the base model alone: how much of the reward X_t already decides.

P-GRAFT scores the final sample X_0 but trains the head on the intermediate state X_t it came
from (the head runs T -> t, the frozen base t -> 0). Two things pull the split t in opposite
directions (paper, Lemma 4.3): the reward seen from X_t gets noisier as t grows, E[Var(r(X_0) | X_t)]
increases ("variance" side), while the law of X_t gets easier to learn ("bias" side). The paper
chooses t by a sweep of fine-tuning runs; :func:`reward_variance` measures the variance side once,
on the base sampler, and :func:`recommend_t` turns it into a choice.

Measurement (for each t of a grid). Draw ``n`` states X_t with the base sampler (T -> t), run
``K`` independent base tails t -> 0 from each of them (each tail with the state's condition) and
score them: a table r[n, K]. This is a one-way random-effects design with the X_t as groups:

- MSW = mean over states of the unbiased within-state variance: estimates E[Var(r | X_t)];
- MSB = K x (unbiased variance of the n state means); E[MSB] = K Var(E[r|X_t]) + E[Var(r|X_t)];
- sigma_b^2 = max(MSB - MSW, 0) / K estimates Var(E[r | X_t]); Var(r) = sigma_b^2 + MSW;
- R^2(t) = sigma_b^2 / (sigma_b^2 + MSW), the intraclass correlation: the fraction of the reward's
  variance that is already decided at X_t (1 at t = 0, where X_t = X_0);
- F = MSB / MSW with (n - 1, n (K - 1)) degrees of freedom tests "X_t carries no information about
  r" (Var(E[r | X_t]) = 0); its p-value is ``scipy.stats.f.sf``.

The 95% intervals of E[Var(r|X_t)] and R^2 are percentile intervals of a cluster bootstrap: the
n states (rows, with their K tails) are resampled with replacement, 1000 times, seeded.

Conditional problems (prompts, labels). GRS selects *within* a group, and a group shares one
condition c (Top-K of the M images of one prompt), so the variance that selection acts on is
Var(r | c), not Var(r): the part of Var(r) that lies between conditions (one prompt is easier than
another) is fixed by the prompt and decided at every t, and would inflate R^2 towards 1 at any t
(it did: on the t2i shapes world's base, R^2 = 0.82 at t = 0.9 with 64 states of 64 prompts, against
0.24 [0.09, 0.32] within prompts, 96 states in 24 prompts). So for a problem with more than one
condition the states are drawn in G = n / s blocks of ``states_per_condition`` = s states, each
block one condition (a seeded choice, without repetition while the conditions last), and the
design is nested, block > state > tail:

- MSW as above; MSB = K sum_i (m_i - m_c(i))^2 / (n - G), the state means m_i around their
  block's mean m_c: E[MSB] = K E_c Var(E[r | X_t, c] | c) + E[Var(r | X_t)] (the mean over
  blocks weighted by their size - 1);
- sigma_b^2 = max(MSB - MSW, 0) / K, ``var_r`` = sigma_b^2 + MSW = E_c Var(r | c), the within-condition
  variance, and R^2 = sigma_b^2 / var_r = 1 - E[Var(r | X_t)] / E_c Var(r | c); F = MSB / MSW with
  (n - G, n (K - 1)) degrees of freedom;
- the bootstrap resamples blocks (each with its s states), so the interval covers the spread over
  prompts as well; the ``conditions`` column is G. With one condition (or none) this is the one-way
  design above.

Kept share. Write h(X_t) = E[r | X_t], so r = h + e with e uncorrelated with h, and let A be the
acceptance of the GRS rule. GRAFT's per-round gain is E[r | A] - E[r] = Cov(r, A) / P(A).
P-GRAFT fine-tunes the head on the accepted X_t; if the head learns their law perfectly, a fresh
sample from head + base has the expected reward of h over the accepted X_t, a gain
E[h | A] - E[h] = Cov(h, A) / P(A). The share of GRAFT's gain that P-GRAFT keeps at t is

    kept(t) = Cov(h, A) / Cov(r, A)        (one round, perfect learning, A decided by r alone).

:func:`kept_share` estimates it from the states x tails table by simulating the rule the user
trains with (``--rule --m --k --alpha --threshold --reward-max``, and ``--groups`` per round for
batch-max ``rs``): groups of M candidates, each a state of the sample and one of its tails as
its reward r, accepted by the rule itself; h of a candidate is the mean of its state's tails that
no candidate of the group uses (unbiased for h and independent of the group's rewards given the
states, so Cov(ĥ, A) = Cov(h, A)). With conditions, a group draws its states from one condition's
block (with replacement, so with s < M states a state serves several candidates, each with a tail
of its own: a group that would need all K tails of a state is left out), and the gains are
summed over conditions, each within its condition. The 95% interval is the cluster bootstrap of
R^2's, each replicate re-simulating the rule.

R^2(t) is the kept share only where E[h | r] is linear in r (then Cov(h, A) = slope Cov(r, A),
slope = Var(h) / Var(r) = R^2: the breeder's equation; exact when h and r are jointly Gaussian,
for every rule). Otherwise the two differ, and by a rule-dependent amount: h = ±1 equiprobable,
e ~ N(0, 0.9^2) gives R^2 = 1/1.81 = 0.55 but a kept share of 0.43 under Best-of-16 and 0.38
under Best-of-32 (the harder the selection, the more it picks tails of e rather than h). A larger
t leaves the head an easier law to learn and keeps more of the sampler, and so the sample, at the
frozen base.

The rule of :func:`recommend_t`: the largest t on the grid whose kept-share lower 95% bound is at
least ``keep`` = 0.5, i.e. that keeps at least half of GRAFT's per-round gain with 95% confidence
under the stated assumptions; without a kept share (no rule given, or none estimable: K tails too
few for the group's uses of a state, or a rule that selects nothing), the same rule on R^2's lower
bound. When no t qualifies, the smallest t on the grid, saying so.

Budget-aware recommendation (``diagnose --train-steps N``). The kept share assumes the head learns
its target perfectly; with a fine-tuning budget of N optimizer steps per round it may not, and how
far it gets can depend on t (the head of a larger t has fewer steps of the sampler to change and an
easier law to learn: the variance side). :func:`learning_probe` measures it: at t = 0 and each t of
the grid it samples one round of candidates from the base (``--groups`` x ``--m``), accepts them by
the rule, fine-tunes a head for N steps on the accepted X_t with train's settings (the training
loop's own step), and compares the reward of head + base with the base's, on the same X_T and noises
(so 0 steps give exactly 0), to the reward shift of its target (the accepted X_t's fresh base tails
against all candidates'): progress(t, N) = realized / target. :func:`predict_gains` combines it with
the kept share:

    gain(t, N) = G0 x kept(t) x progress(t, N),  G0 = GRAFT's one-round ideal gain E[r | A] - E[r],

and :func:`recommend_budget_t` picks the t of largest predicted gain (ties to the smaller t; t = 0
when nothing is predicted to gain). One round, one seed: the printed interval carries the kept
share's uncertainty only, not the probe's. benchmarks/budget.py measures the same trade-off with
full runs (docs/results/<app>_budget*.txt) and compares its best t with this recommendation
(``<app>_budget_validation.txt``).

The grid values are train's ``--t``: the fraction of sampler steps left to the frozen base, rounded
to the sampler grid in the same way (the ``t_grid`` column is the time of the grid point used);
t = 1 is X_T itself. Generic: apps hand in a :class:`~pgraft.core.trainer.GraftProblem` and a base.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .grs import GRSConfig, accept
from .progress import make_console, progress_bar
from .sampling import sample
from .schedules import split_index
from .state import cat, index, module_device, repeat_interleave, to_device
from .trainer import GraftConfig, GraftProblem, derive_seed, generator_for

COLUMNS = ["t", "t_grid", "n_states", "tails", "conditions", "var_r", "evar", "evar_lo", "evar_hi", "r2", "r2_lo", "r2_hi",
           "kept", "kept_lo", "kept_hi", "F", "p_value", "seconds"]
DEFAULT_GRID = (0.1, 0.25, 0.5, 0.75, 0.9)
BOOTSTRAP = 1000
LEVEL = 0.95
KEEP = 0.5
STATES_PER_CONDITION = 4  # s: states drawn per condition in conditional problems (module docstring)
KEPT_GROUPS = 4096  # simulated GRS groups for the kept share's point estimate
KEPT_BOOT = 200  # bootstrap replicates of the kept share (each re-simulates the rule)
KEPT_BOOT_GROUPS = 1024  # simulated groups per bootstrap replicate

# seed streams of this module (the last part of generator_for's key; distinct from trainer.Stream)
_HEADS = 1 << 26  # X_T and the base over T -> t, per chunk of states: the same X_T for every t
_TAILS = 1 << 27  # the K tails t -> 0, per t and chunk
_BOOT = 1 << 28  # bootstrap resampling, per t
_CONDS = 1 << 29  # the conditions a conditional diagnosis draws its states for
_KEPT = 1 << 30  # the kept share's simulated groups and its bootstrap, per t


# ----------------------------------------------------------------------------- estimates
def _groups(r: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    if groups is None:
        return np.zeros(r.shape[0], dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != (r.shape[0],):
        raise ValueError(f"groups must give one condition per state ({r.shape[0]}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def _within_condition_ss(means: np.ndarray, groups: np.ndarray, n_groups: int) -> float:
    """sum over states of (m_i - the mean of its condition's states)^2."""
    sums = np.bincount(groups, weights=means, minlength=n_groups)
    counts = np.bincount(groups, minlength=n_groups)
    return float(np.square(means - (sums / np.maximum(counts, 1))[groups]).sum())


def variance_components(r: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
    """Random-effects ANOVA of ``r`` [n states, K tails] (see the module docstring): one-way, or, with
    ``groups`` (the condition of each state), nested within conditions. Returns var_r, evar (= MSW),
    sigma_b2, r2, F and its p_value."""
    from scipy.stats import f as f_dist

    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise ValueError(f"need rewards of shape [n >= 2 states, K >= 2 tails], got {r.shape}")
    n, k = r.shape
    g = _groups(r, groups)
    n_groups = int(g.max()) + 1
    df_b = n - n_groups
    if df_b < 1:
        raise ValueError(f"need at least one condition with 2 or more states, got {n} states in {n_groups} conditions")
    msw = float(r.var(axis=1, ddof=1).mean())
    msb = k * _within_condition_ss(r.mean(axis=1), g, n_groups) / df_b
    sigma_b2 = max(msb - msw, 0.0) / k
    var_r = sigma_b2 + msw
    r2 = sigma_b2 / var_r if var_r > 0 else math.nan
    if msw > 0:
        F = msb / msw
        p_value = float(f_dist.sf(F, df_b, n * (k - 1)))
    else:  # every tail of every state agrees: r is a function of X_t (or constant)
        F, p_value = (math.inf, 0.0) if msb > 0 else (math.nan, math.nan)
    return {"var_r": var_r, "evar": msw, "sigma_b2": sigma_b2, "r2": r2, "F": F, "p_value": p_value}


def bootstrap_intervals(r: np.ndarray, n_boot: int = BOOTSTRAP, level: float = LEVEL,
                        rng: np.random.Generator | None = None,
                        groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile intervals of evar and r2 by a cluster bootstrap: over the states (rows of ``r``),
    or, with ``groups`` naming more than one condition, over the conditions (each with its states)."""
    r = np.asarray(r, dtype=np.float64)
    n, k = r.shape
    rng = rng if rng is not None else np.random.default_rng(0)
    means, within = r.mean(axis=1), r.var(axis=1, ddof=1)
    g = _groups(r, groups)
    n_groups = int(g.max()) + 1
    evar, r2 = np.empty(n_boot), np.empty(n_boot)
    if n_groups == 1:
        for lo in range(0, n_boot, 256):  # [B, n] index blocks: bounded memory for large n
            idx = rng.integers(0, n, size=(min(n_boot, lo + 256) - lo, n))
            msw = within[idx].mean(axis=1)
            msb = k * means[idx].var(axis=1, ddof=1)
            sigma_b2 = np.maximum(msb - msw, 0.0) / k
            total = sigma_b2 + msw
            evar[lo:lo + len(idx)] = msw
            with np.errstate(invalid="ignore", divide="ignore"):
                r2[lo:lo + len(idx)] = np.where(total > 0, sigma_b2 / total, np.nan)
    else:
        members = [np.flatnonzero(g == c) for c in range(n_groups)]
        for b in range(n_boot):
            pick = rng.integers(0, n_groups, size=n_groups)  # conditions, with replacement
            rows = np.concatenate([members[c] for c in pick])
            labels = np.repeat(np.arange(n_groups), [len(members[c]) for c in pick])
            df_b = len(rows) - n_groups
            msw = float(within[rows].mean())
            msb = k * _within_condition_ss(means[rows], labels, n_groups) / df_b if df_b > 0 else math.nan
            sigma_b2 = max(msb - msw, 0.0) / k
            evar[b] = msw
            r2[b] = sigma_b2 / (sigma_b2 + msw) if sigma_b2 + msw > 0 else math.nan
    return {"evar": _percentile_interval(evar, level), "r2": _percentile_interval(r2, level)}


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates, NaN ones left out (nan, nan
    when every replicate is NaN)."""
    if np.isnan(values).all():
        return math.nan, math.nan
    lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- kept share
def _block_members(n: int, groups: np.ndarray | None) -> list[torch.Tensor]:
    """The state ids of each condition block with at least 2 states (a block of one state cannot
    be selected within: it is left out)."""
    g = np.zeros(n, dtype=np.int64) if groups is None else _groups(np.empty((n, 0)), groups)
    members = [torch.from_numpy(np.flatnonzero(g == b)) for b in range(int(g.max()) + 1)]
    return [m for m in members if len(m) >= 2]


def simulate_gains(r: torch.Tensor, members: Sequence[torch.Tensor], grs: GRSConfig, group_size: int,
                   n_groups: int, generator: torch.Generator, round_groups: int | None = None) -> tuple[float, float]:
    """(gain of h, gain of r) of one simulation of the GRS rule ``grs`` on groups of ``group_size``
    candidates drawn from the states x tails table ``r`` [n, K] (module docstring, "Kept share").

    ``members``: the state ids of each condition block (ids may repeat: a bootstrap resample); the
    ``n_groups`` groups go round-robin over the blocks and draw their states uniformly from the
    block, with replacement. Each candidate is scored by one tail of its state (the state's uses in
    a group take distinct tails) and h = E[r | X_t] is estimated by the mean of the state's tails
    that no candidate of the group uses, which is independent of the group's rewards given the
    states, so Cov(ĥ, A) = Cov(h, A). A group whose states would need all K tails is redrawn
    (left out). ``round_groups``: groups per round for ``rs`` without a bound (the round's maximum
    is its bound; None: one round). Gains per block: E[x | A] - E[x] for x = r and x = ĥ, summed over
    the blocks with an acceptance; nan, nan when nothing was accepted.
    """
    k = r.shape[1]
    m = group_size
    sizes = torch.tensor([len(x) for x in members])
    table = torch.zeros(len(members), int(sizes.max()), dtype=torch.long)
    for b, ids in enumerate(members):
        table[b, : len(ids)] = ids
    batchmax = grs.rule == "rs" and grs.bound is None
    per_round = (round_groups or n_groups) if batchmax else 1
    g = math.ceil(n_groups / per_round) * per_round
    block = torch.arange(g) % len(members)
    pos = (torch.rand(g, m, generator=generator, dtype=torch.float64) * sizes[block, None]).long()
    state = table[block[:, None], torch.minimum(pos, sizes[block, None] - 1)]  # [G, M]
    same = state[:, :, None] == state[:, None, :]  # [G, M, M]
    uses = same.sum(2)  # how many candidates of the group share this one's state
    first = same.int().argmax(2)  # the group's first candidate with this state
    occurrence = (same & torch.ones(m, m, dtype=torch.bool).tril(-1)).sum(2)  # earlier ones with this state
    tail_order = torch.rand(g, m, k, generator=generator).argsort(2)  # one per candidate; the first's is used
    tails = r[state].gather(2, tail_order.gather(1, first[..., None].expand(-1, -1, k)))  # [G, M, K], in order
    score = tails.gather(2, occurrence.clamp_max(k - 1)[..., None]).squeeze(2)  # its tail (groups left out below: any)
    used = tails.cumsum(2).gather(2, (uses - 1).clamp(0, k - 1)[..., None]).squeeze(2)  # the group's tails of it
    h = (tails.sum(2) - used) / (k - uses).clamp_min(1)  # the state's unused tails
    ok = (uses < k).all(1)
    if batchmax:  # whole rounds only
        keep = int(ok.sum()) // per_round * per_round
        ok &= ok.cumsum(0) <= keep
    if not bool(ok.any()):
        return math.nan, math.nan
    score, h, block = score[ok].flatten(), h[ok].flatten(), block[ok].repeat_interleave(m)
    ids = torch.arange(len(score)) // m
    if batchmax:
        size = per_round * m
        accepted = torch.cat([accept(score[i:i + size], ids[i:i + size], grs, generator)
                              for i in range(0, len(score), size)])
    else:
        accepted = accept(score, ids, grs, generator)
    a = accepted.double()
    n_b = torch.bincount(block, minlength=len(members)).double()
    acc_b = torch.bincount(block, weights=a, minlength=len(members))
    live = acc_b > 0
    if not bool(live.any()):
        return math.nan, math.nan

    def gain(x: torch.Tensor) -> float:
        mean_acc = torch.bincount(block, weights=x * a, minlength=len(members))[live] / acc_b[live]
        mean_all = torch.bincount(block, weights=x, minlength=len(members))[live] / n_b[live]
        return float((mean_acc - mean_all).sum())

    return gain(h), gain(score)


def _ratio(gains: tuple[float, float]) -> float:
    gain_h, gain_r = gains
    return gain_h / gain_r if gain_r > 0 else math.nan


def _kept_inputs(r: np.ndarray, groups: np.ndarray | None,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Generator]:
    """The states x tails table as a tensor (checked), the condition blocks' state ids
    (:func:`_block_members`) and the generator (seed 0 when none), for :func:`kept_share` and its
    interval."""
    r_t = torch.as_tensor(np.asarray(r, dtype=np.float64))
    if r_t.ndim != 2 or r_t.shape[1] < 2:
        raise ValueError(f"need rewards of shape [n states, K >= 2 tails], got {tuple(r_t.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return r_t, _block_members(r_t.shape[0], groups), generator


def kept_share(r: np.ndarray, grs: GRSConfig, group_size: int, groups: np.ndarray | None = None,
               round_groups: int | None = None, n_groups: int = KEPT_GROUPS,
               generator: torch.Generator | None = None) -> float:
    """The share of GRAFT's per-round reward gain that P-GRAFT keeps at this t, under the rule
    ``grs`` on groups of ``group_size``, estimated from the rewards ``r`` [n states, K tails]:

        kept = (E[h | A] - E[h]) / (E[r | A] - E[r]) = Cov(h, A) / Cov(r, A),   h = E[r | X_t],

    A the acceptance of a candidate whose reward r is one tail of its state (:func:`simulate_gains`,
    ``n_groups`` simulated groups; with ``groups``, the condition of each state, both gains are
    summed over conditions, each within its condition). Assumes perfect learning of the accepted
    law of X_t, one round, and acceptance decided by r alone (no dedup). nan when the rule accepts
    nothing, selects nothing, or K tails cannot serve the group's uses of a state."""
    r_t, members, generator = _kept_inputs(r, groups, generator)
    if not members:
        return math.nan
    return _ratio(simulate_gains(r_t, members, grs, group_size, n_groups, generator, round_groups))


def kept_share_interval(r: np.ndarray, grs: GRSConfig, group_size: int, groups: np.ndarray | None = None,
                        round_groups: int | None = None, n_boot: int = KEPT_BOOT, n_groups: int = KEPT_BOOT_GROUPS,
                        level: float = LEVEL, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Percentile interval of :func:`kept_share` by the cluster bootstrap of
    :func:`bootstrap_intervals` (states, or condition blocks with their states, resampled with
    replacement), each replicate re-simulating the rule on ``n_groups`` groups (so the interval
    also holds the simulation's own noise)."""
    r_t, members, generator = _kept_inputs(r, groups, generator)
    if not members:
        return math.nan, math.nan
    values = np.empty(n_boot)
    for b in range(n_boot):
        if len(members) == 1:  # the states, with replacement (a repeated state keeps its id: tails stay distinct)
            ids = members[0]
            picked = [ids[torch.randint(len(ids), (len(ids),), generator=generator)]]
        else:  # the condition blocks, each with its states
            picked = [members[i] for i in torch.randint(len(members), (len(members),), generator=generator).tolist()]
        picked = [p for p in picked if len(torch.unique(p)) >= 2]
        values[b] = (_ratio(simulate_gains(r_t, picked, grs, group_size, n_groups, generator, round_groups))
                     if picked else math.nan)
    return _percentile_interval(values, level)


def describe_rule(rule: GraftConfig) -> str:
    """The GRS rule of ``rule`` in words, e.g. ``topk K=2 of M=8``."""
    grs, m = rule.grs, rule.group_size
    if grs.rule == "rs":
        bound = f"bound {grs.bound:g}" if grs.bound is not None else f"batch-max bound over rounds of {rule.groups}x{m}"
        return f"rs α={grs.alpha:g}, {bound}"
    if grs.rule == "bon":
        return f"bon N={m}"
    if grs.rule == "topk":
        return f"topk K={grs.k} of M={m}"
    return f"threshold τ={grs.threshold:g}"


# ----------------------------------------------------------------------------- sampling
def grid_index(times: torch.Tensor, t: float) -> int:
    """Index of split ``t`` in the sampler grid: train's ``split_times(times, t).index`` (the
    fraction of steps left to the base, rounded to the grid), with t = 1 (and anything that rounds
    to the first point) meaning X_T itself, which train refuses only because it leaves nothing to
    fine-tune."""
    if not 0.0 < float(t) <= 1.0:
        raise ValueError(f"split t must be in (0, 1], got {t!r}")
    return 0 if float(t) >= 1.0 else split_index(times, float(t), "fraction")


def check_grid(t_grid: Sequence[float]) -> list[float]:
    """The grid as floats, each in (0, 1] (ValueError naming the bad value otherwise)."""
    grid = [float(t) for t in t_grid]
    if not grid:
        raise ValueError("the t grid is empty")
    for t in grid:
        if not 0.0 < t <= 1.0:  # also refuses nan
            raise ValueError(f"every t must be in (0, 1], got {t}")
    return grid


def parse_grid(text: str) -> list[float]:
    """``"0.1,0.25,0.5"`` -> [0.1, 0.25, 0.5]; ValueError for an empty, unparsable or out-of-range entry."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"expected a comma list of numbers in (0, 1], e.g. 0.1,0.25,0.5; got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected a comma list of numbers in (0, 1], e.g. 0.1,0.25,0.5; got {text!r}") from None
    return check_grid(values)


def condition_blocks(problem: GraftProblem, n_states: int, states_per_condition: int = STATES_PER_CONDITION,
                     seed: int = 0) -> torch.Tensor:
    """The condition index of each of ``n_states`` states: None / one condition: all 0; otherwise
    blocks of ``states_per_condition`` consecutive states per condition, the conditions a seeded
    random choice without repetition (with repetition only when there are more blocks than conditions)."""
    n_cond = 1 if problem.conditions is None else len(problem.conditions)
    if n_cond == 1:
        return torch.zeros(n_states, dtype=torch.long)
    if states_per_condition < 2:
        raise ValueError(f"states_per_condition must be >= 2 (a condition needs 2 states to compare), "
                         f"got {states_per_condition}")
    blocks = math.ceil(n_states / states_per_condition)
    order = torch.randperm(n_cond, generator=torch.Generator().manual_seed(derive_seed(seed, _CONDS)))
    chosen = order[torch.arange(blocks) % n_cond]
    return chosen[torch.arange(n_states) // states_per_condition]


def _rewards_at(problem: GraftProblem, base: nn.Module, k: int, n_states: int, tails: int, seed: int,
                batch_size: int, advance, states_per_condition: int = STATES_PER_CONDITION) -> tuple[np.ndarray, np.ndarray]:
    """Rewards [n_states, tails] of K base tails from each of n base states X_t (t = times[k])."""
    times, device = problem.times, module_device(base)
    cond_index = condition_blocks(problem, n_states, states_per_condition, seed)  # tails share their state's
    # score with the reward alone: dedup keys, records and metrics are not needed here
    lean = dataclasses.replace(problem, key=None, describe=None, metrics=None, on_round=None)
    states = []
    for c, lo in enumerate(range(0, n_states, batch_size)):
        hi = min(n_states, lo + batch_size)
        gen = generator_for(seed, c, _HEADS)
        x = to_device(problem.prior(hi - lo, gen), device)
        x = sample(base, x, times[: k + 1], problem.step, problem.cond_batch(cond_index[lo:hi]), gen, advance)
        states.append(to_device(x, "cpu"))
    rows, row_cond = repeat_interleave(cat(states), tails), cond_index.repeat_interleave(tails)
    rewards = []
    for c, lo in enumerate(range(0, n_states * tails, batch_size)):
        hi = min(n_states * tails, lo + batch_size)
        gen = generator_for(seed, k, c, _TAILS)
        cond = problem.cond_batch(row_cond[lo:hi])
        x0 = sample(base, to_device(index(rows, slice(lo, hi)), device), times[k:], problem.step, cond, gen, advance)
        rewards.append(lean.scores(to_device(x0, "cpu"), cond).rewards)
    r = torch.cat(rewards).view(n_states, tails).numpy()
    if not np.isfinite(r).all():
        raise ValueError("the reward returned non-finite values")
    one = problem.conditions is None or len(problem.conditions) == 1
    # the blocks are the clusters (a condition drawn twice gives two blocks: still centred on its own mean)
    return r, np.zeros(n_states, dtype=np.int64) if one else np.arange(n_states) // states_per_condition


def _chunks(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@torch.no_grad()
def reward_variance(problem: GraftProblem, base: nn.Module, t_grid: Sequence[float] = DEFAULT_GRID,
                    n_states: int = 64, tails: int = 8, seed: int = 0, batch_size: int = 256,
                    show_progress: bool = True, n_boot: int = BOOTSTRAP,
                    states_per_condition: int = STATES_PER_CONDITION,
                    rule: GraftConfig | None = None) -> pd.DataFrame:
    """The diagnosis table, one row per t of ``t_grid`` (columns :data:`COLUMNS`; see the module
    docstring). Samples with ``base`` on its device, ``batch_size`` rows per sampler call; X_T is
    drawn from the same seeds for every t (common random numbers across the grid). A problem with
    several conditions is diagnosed within conditions (``states_per_condition`` states each).
    ``rule``: the GRS rule train will use (``grs``, ``group_size``, and ``groups`` per round for
    batch-max ``rs``): the kept-share columns are estimated under it (:func:`kept_share`); None
    leaves them nan."""
    grid = check_grid(t_grid)
    if n_states < 2 or tails < 2:
        raise ValueError(f"need at least 2 states and 2 tails per state, got {n_states} and {tails}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    base = base.eval()
    steps = len(problem.times) - 1
    ks = [grid_index(problem.times, t) for t in grid]
    total = sum(_chunks(n_states, batch_size) * k + _chunks(n_states * tails, batch_size) * (steps - k) for k in ks)
    rows = []
    with progress_bar(total, f"diagnose: {n_states} states x {tails} tails per t", show_progress) as advance:
        for t, k in zip(grid, ks):
            t0 = time.time()
            r, groups = _rewards_at(problem, base, k, n_states, tails, seed, batch_size, advance, states_per_condition)
            est = variance_components(r, groups)
            ci = bootstrap_intervals(r, n_boot, LEVEL, np.random.default_rng(derive_seed(seed, k, _BOOT)), groups)
            kept, kept_ci = math.nan, (math.nan, math.nan)
            if rule is not None:
                gen = generator_for(seed, k, _KEPT)
                kept = kept_share(r, rule.grs, rule.group_size, groups, rule.groups, generator=gen)
                kept_ci = kept_share_interval(r, rule.grs, rule.group_size, groups, rule.groups, generator=gen)
            rows.append({"t": t, "t_grid": float(problem.times[k]), "n_states": n_states, "tails": tails,
                         "conditions": int(len(np.unique(groups))),
                         "var_r": est["var_r"], "evar": est["evar"], "evar_lo": ci["evar"][0],
                         "evar_hi": ci["evar"][1], "r2": est["r2"], "r2_lo": ci["r2"][0], "r2_hi": ci["r2"][1],
                         "kept": kept, "kept_lo": kept_ci[0], "kept_hi": kept_ci[1],
                         "F": est["F"], "p_value": est["p_value"], "seconds": time.time() - t0})
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- decision and outputs
KEPT_ASSUMPTIONS = ("estimated by simulating the rule on the base's states x tails; assumes the head learns the "
                    "accepted law of X_t perfectly, one round, acceptance decided by r alone")


def recommend_t(table: pd.DataFrame, keep: float = KEEP, rule: str = "") -> tuple[float, str]:
    """(t, reason): the largest t whose kept-share lower bound ``kept_lo`` is >= ``keep`` when the
    table has one (a number somewhere in the column; nan never qualifies), else the largest t whose
    R^2 lower bound ``r2_lo`` is (see the module docstring); when none qualifies, the smallest t
    of the table, and the reason says so. ``rule``: the rule in words, for the reason."""
    if table.empty:
        raise ValueError("empty diagnosis table")
    kept = "kept_lo" in table and bool(table["kept_lo"].notna().any())
    column = "kept_lo" if kept else "r2_lo"
    under = f" under {rule}" if rule else ""
    ok = table[table[column] >= keep]  # NaN bounds never qualify
    if len(ok):
        row = ok.loc[ok["t"].idxmax()]
        if kept:
            return float(row["t"]), (f"largest t whose kept-share lower 95% bound {row['kept_lo']:.3f} >= {keep:g}: "
                                     f"P-GRAFT at this t keeps >= {keep:.0%} of GRAFT's per-round reward gain{under} "
                                     f"({KEPT_ASSUMPTIONS}; R^2 = {row['r2']:.3f})")
        return float(row["t"]), (f"largest t with R^2 lower 95% bound {row['r2_lo']:.3f} >= {keep:g}: X_t already "
                                 f"decides >= {keep:.0%} of the reward's variance; R^2 is the share of the selection's "
                                 "gain P-GRAFT keeps only where E[E[r|X_t] | r] is linear in r (no kept share "
                                 "was estimated)")
    row = table.loc[table["t"].idxmin()]
    best = table.loc[table[column].fillna(-math.inf).idxmax()]
    what = "kept-share" if kept else "R^2"
    return float(row["t"]), (f"no t on the grid has a {what} lower 95% bound >= {keep:g} (best: t={best['t']:g}, "
                             f"{column}={best[column]:.3f}); smallest t of the grid, consider "
                             "plain GRAFT (t = 0) or a finer grid below it")


# ----------------------------------------------------------------------------- budget-aware: the learning probe
PROBE_COLUMNS = ["t", "train_steps", "candidates", "accepted", "kept", "kept_lo", "kept_hi", "target_shift",
                 "realized_shift", "progress", "predicted_gain", "predicted_lo", "predicted_hi", "seconds"]
_PROBE_TAILS = 1 << 31  # the fresh base tail scored from each probe candidate's X_t
_PROBE_EVAL = (1 << 31) + 1  # the paired head / base evaluation samples


@dataclasses.dataclass
class _OneProcess:
    """The few accelerator members ``trainer._train`` uses, for one process on ``device``."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _tail_rewards(problem: GraftProblem, base: nn.Module, x_t, cond_index: torch.Tensor, k: int, seed: int,
                  batch_size: int) -> torch.Tensor:
    """One fresh base tail t -> 0 from every state (its own condition), scored: r' with E[r' | X_t] = h(X_t)."""
    device, n = module_device(base), len(cond_index)
    lean = dataclasses.replace(problem, key=None, describe=None, metrics=None, on_round=None)
    out = []
    for c, lo in enumerate(range(0, n, batch_size)):
        hi = min(n, lo + batch_size)
        gen = generator_for(seed, k, c, _PROBE_TAILS)
        cond = problem.cond_batch(cond_index[lo:hi])
        x0 = sample(base, to_device(index(x_t, slice(lo, hi)), device), problem.times[k:], problem.step, cond, gen)
        out.append(lean.scores(to_device(x0, "cpu"), cond).rewards)
    return torch.cat(out).double()


def _paired_reward(problem: GraftProblem, head: nn.Module, base: nn.Module, n: int, split: float, seed: int,
                   batch_size: int) -> float:
    """Mean reward of ``n`` samples of head (T -> t) + base (t -> 0), conditions cycled; with the
    same ``seed`` two heads see the same X_T and noises (common random numbers)."""
    from .trainer import sample_finetuned

    n_cond = 1 if problem.conditions is None else len(problem.conditions)
    cond_index = torch.arange(n) % n_cond
    lean = dataclasses.replace(problem, key=None, describe=None, metrics=None, on_round=None)
    _, x0 = sample_finetuned(lean, head, base, n, split, seed=seed, batch=batch_size, cond_index=cond_index,
                             show_progress=False)
    rewards = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        rewards.append(lean.scores(index(x0, slice(lo, hi)), problem.cond_batch(cond_index[lo:hi])).rewards)
    return float(torch.cat(rewards).double().mean())


def learning_probe(problem: GraftProblem, base: nn.Module, cfg: GraftConfig, t: float, n_eval: int = 512,
                   seed: int = 0, batch_size: int = 256) -> dict[str, float]:
    """How far ``cfg.train_steps`` optimizer steps take the head toward its target at split ``t``,
    in reward units (one round of GRAFT / P-GRAFT on a probe of the base):

    1. sample one round's candidates with the base (``cfg.groups`` groups of ``cfg.group_size``) and
       accept them with ``cfg.grs``; the accepted X_t are the head's training set, their law its target;
    2. ``target_shift`` = mean over the accepted of r' minus its mean over all candidates, where r'
       is the reward of one FRESH base tail t -> 0 from each X_t (unbiased for E[h | A] - E[h], the
       reward gain of a head that learned the target exactly; at t = 0, r' = r and it is GRAFT's
       one-round gain E[r | A] - E[r]);
    3. fine-tune a head (``build_head``: the base, or LoRA with ``cfg.lora_rank``) for
       ``cfg.train_steps`` steps on the accepted X_t with the app's loss (the training loop's own
       ``_train``: batch size, lr, cosine decay, clipping, anchor from ``cfg``);
    4. ``realized_shift`` = mean reward of head + base minus that of the base alone, both on
       ``n_eval`` samples from the same X_T and noises (paired: 0 exactly at 0 steps);
    5. ``progress`` = realized_shift / target_shift (nan when the target shift is not > 0).

    Seeded by ``seed`` (candidates, acceptance, training batches, evaluation)."""
    from .heads import build_head, merged_copy
    from .schedules import split_times
    from .selection import select
    from .trainer import FineTuning, Stream, _train, sample_candidates

    t0 = time.time()
    cfg = dataclasses.replace(cfg, split=t, rounds=1, seed=seed, sample_batch_size=batch_size, final_eval=False)
    split = split_times(problem.times, t)
    lean = dataclasses.replace(problem, key=None, describe=None, metrics=None, on_round=None)
    base = base.eval().requires_grad_(False)
    cands = sample_candidates(lean, base, base, cfg, 0, None, show_progress=False)
    chosen = select(cands.rewards, cands.groups, cfg.grs, generator_for(seed, 0, Stream.ACCEPT), 0)
    accepted = chosen.accepted
    fresh = _tail_rewards(problem, base, cands.x_t, cands.cond_index, split.index, seed, batch_size)
    target = float(fresh[accepted].mean() - fresh.mean()) if accepted.any() else math.nan
    idx = chosen.index
    head = build_head(base, cfg, init_seed=derive_seed(seed, Stream.LORA_INIT))
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    fit = FineTuning(lean, head, opt, base, cfg, split.t, _OneProcess(module_device(base)), show_progress=False)
    if len(idx):
        _train(fit, index(cands.x_t, idx), cands.cond_index[idx], 0)
    head = merged_copy(head).eval().requires_grad_(False)
    eval_seed = derive_seed(seed, _PROBE_EVAL)
    realized = (_paired_reward(problem, head, base, n_eval, t, eval_seed, batch_size)
                - _paired_reward(problem, base, base, n_eval, t, eval_seed, batch_size))
    progress = realized / target if target > 0 else math.nan
    return {"t": t, "train_steps": cfg.train_steps, "candidates": len(cands.rewards), "accepted": int(accepted.sum()),
            "target_shift": target, "realized_shift": realized, "progress": progress, "seconds": time.time() - t0}


PROBE_NOTE = ("predicted_gain = G0 x kept x progress, G0 = GRAFT's one-round ideal gain, progress = the head's "
              "paired reward shift over the base / its target's; one round; the interval carries kept's only")


def predict_gains(probe: pd.DataFrame, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The predicted one-round reward gain of P-GRAFT at each t of ``probe`` after its training
    budget:

        gain(t, N) = G0 * kept(t) * progress(t, N)

    G0 = GRAFT's one-round ideal gain (the probe's ``target_shift`` at t = 0, which the probe table
    must hold), kept(t) = the share of it P-GRAFT keeps at t with a perfect head (the diagnosis
    table's ``kept`` with its 95% interval, else its ``r2``; 1 at t = 0; without a table, the probe's
    own ``target_shift`` / G0), progress(t, N) = the share of its own target the head reached in N
    steps (:func:`learning_probe`). ``predicted_lo`` / ``predicted_hi`` carry kept's interval only.
    Returns the probe table with the columns :data:`PROBE_COLUMNS`."""
    if not (probe["t"] == 0).any():
        raise ValueError("the probe table needs a t = 0 row (GRAFT's gain G0)")
    g0 = float(probe.loc[probe["t"] == 0, "target_shift"].iloc[0])
    out = probe.copy()
    kept, lo, hi = [], [], []
    for t, shift in zip(out["t"], out["target_shift"]):
        if t == 0:
            kept.append(1.0), lo.append(1.0), hi.append(1.0)
            continue
        row = None if table is None else table[np.isclose(table["t"], t)]
        if row is not None and len(row):
            r = row.iloc[0]
            has_kept = "kept" in r and not math.isnan(r["kept"])
            cols = ("kept", "kept_lo", "kept_hi") if has_kept else ("r2", "r2_lo", "r2_hi")
            kept.append(float(r[cols[0]])), lo.append(float(r[cols[1]])), hi.append(float(r[cols[2]]))
        else:
            share = shift / g0 if g0 > 0 else math.nan
            kept.append(share), lo.append(math.nan), hi.append(math.nan)
    out["kept"], out["kept_lo"], out["kept_hi"] = kept, lo, hi
    progress = out["progress"].clip(lower=0.0)
    out["predicted_gain"] = g0 * out["kept"] * progress
    out["predicted_lo"] = g0 * out["kept_lo"] * progress
    out["predicted_hi"] = g0 * out["kept_hi"] * progress
    return out[PROBE_COLUMNS]


def recommend_budget_t(pred: pd.DataFrame) -> tuple[float, str]:
    """(t, reason): the t of largest predicted gain (:func:`predict_gains`); ties go to the smaller
    t (less of the sampler left to the frozen base); t = 0 when no gain is predicted anywhere."""
    if pred.empty:
        raise ValueError("empty probe table")
    gains = pred["predicted_gain"].fillna(-math.inf)
    best = pred.loc[gains[gains == gains.max()].index].sort_values("t").iloc[0]
    steps = int(best["train_steps"])
    if not math.isfinite(best["predicted_gain"]) or best["predicted_gain"] <= 0:
        return 0.0, f"no t is predicted to gain reward in {steps} steps; plain GRAFT (t = 0)"
    ref = pred[pred["t"] == 0]
    vs = ""
    if len(ref) and best["t"] != 0:
        r = ref.iloc[0]
        vs = (f"; t = 0 predicts {r['predicted_gain']:.4g} (progress {r['progress']:.2f}), "
              f"t = {best['t']:g} keeps {best['kept']:.2f} of G0 but reaches {best['progress']:.2f} of its target")
    return float(best["t"]), (f"largest predicted one-round reward gain after {steps} steps: "
                              f"{best['predicted_gain']:.4g} = G0 x kept x progress{vs}")


def run_probe(problem: GraftProblem, base: nn.Module, cfg: GraftConfig, t_grid: Sequence[float],
              table: pd.DataFrame | None = None, n_eval: int = 512, seed: int = 0, batch_size: int = 256,
              show_progress: bool = True) -> pd.DataFrame:
    """:func:`learning_probe` at t = 0 and every t of ``t_grid``, combined by :func:`predict_gains`."""
    rows = []
    grid = [0.0] + [t for t in t_grid if t > 0]
    with progress_bar(len(grid), f"learning probe: {cfg.train_steps} steps per t", show_progress) as advance:
        for t in grid:
            rows.append(learning_probe(problem, base, cfg, t, n_eval, seed, batch_size))
            advance(1)
    return predict_gains(pd.DataFrame(rows), table)


def plot_diagnosis(table: pd.DataFrame, path: str | Path, keep: float = KEEP, recommended: float | None = None,
                   title: str = "") -> Path:
    """Two panels against t: E[Var(r | X_t)] (with Var(r)) and R^2(t) with the kept share (when the
    table has one), each with its 95% interval, the ``keep`` line, and the recommended t when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table.sort_values("t")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    ax.fill_between(table["t"], table["evar_lo"], table["evar_hi"], alpha=0.25, label="95% interval")
    ax.plot(table["t"], table["evar"], "o-", label="E[Var(r | X_t)]")
    ax.plot(table["t"], table["var_r"], "k--", lw=1, label="Var(r)")
    ax.set_ylabel("reward variance")
    ax = axes[1]
    ax.fill_between(table["t"], table["r2_lo"], table["r2_hi"], alpha=0.25, label="95% interval")
    ax.plot(table["t"], table["r2"], "o-", label="R^2 = Var(E[r|X_t]) / Var(r)")
    if "kept" in table and table["kept"].notna().any():
        ax.fill_between(table["t"], table["kept_lo"], table["kept_hi"], alpha=0.25, color="tab:orange")
        ax.plot(table["t"], table["kept"], "s-", color="tab:orange", label="kept share of GRAFT's gain (simulated rule)")
    ax.axhline(keep, color="r", lw=1, ls=":", label=f"keep = {keep:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share (R^2; gain kept by P-GRAFT)")
    for ax in axes:
        if recommended is not None:
            ax.axvline(recommended, color="g", lw=1, ls="--", label=f"recommended t = {recommended:g}")
        ax.set_xlabel("t (fraction of steps left to the base)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """The diagnosis table as CSV (full precision)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def format_table(table: pd.DataFrame) -> str:
    """The table as text: 3 decimals, p-values to 3 significant digits."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}",
                           formatters={"p_value": lambda v: f"{v:.3g}"})


def run_diagnose(problem: GraftProblem, base: nn.Module, t_grid: Sequence[float] = DEFAULT_GRID,
                 n_states: int = 64, tails: int = 8, seed: int = 0, batch: int = 256,
                 out_dir: str | Path = "runs/diagnose", show_progress: bool = True, keep: float = KEEP,
                 device: torch.device | str | None = None,
                 states_per_condition: int = STATES_PER_CONDITION, rule: GraftConfig | None = None,
                 train: GraftConfig | None = None) -> pd.DataFrame:
    """The body of every ``pgraft <app> diagnose``: measure (on ``device``, default the GPU when torch
    sees one), print the table and ``recommended t: X (reason)``, write ``diagnose.csv`` and
    ``diagnose.png`` to ``out_dir``; returns the table. ``rule``: the GRS rule train will use, for
    the kept share (:func:`reward_variance`). ``train``: the rule with train's fine-tuning settings
    and ``train_steps`` > 0: then the learning probe runs too (:func:`run_probe`, one round's
    candidates evaluated with as many samples), its table is printed and written to ``probe.csv``,
    and ``recommended t at N steps: X (reason)`` follows."""
    from .state import default_device

    base = base.eval().requires_grad_(False).to(device if device is not None else default_device())
    table = reward_variance(problem, base, t_grid, n_states, tails, seed, batch, show_progress,
                            states_per_condition=states_per_condition, rule=rule)
    t, reason = recommend_t(table, keep, describe_rule(rule) if rule is not None else "")
    out_dir = Path(out_dir)
    csv = write_table(table, out_dir / "diagnose.csv")
    png = plot_diagnosis(table, out_dir / "diagnose.png", keep, t, title=f"{n_states} states x {tails} tails per t"
                         + ("" if table["conditions"].iloc[0] == 1 else
                            f", within {table['conditions'].iloc[0]} conditions"))
    console = make_console()
    console.print(format_table(table), highlight=False, markup=False, soft_wrap=True)
    if rule is not None:
        note = (f"kept = share of GRAFT's per-round gain that P-GRAFT keeps at t under {describe_rule(rule)} "
                f"({KEPT_ASSUMPTIONS})")
        if table["kept"].isna().all():
            note += (": not estimable here (a group needs a state's tail that none of its candidates uses: raise "
                     "--tails or --states; or the rule accepted or selected nothing); falling back to R^2")
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    console.print(f"recommended t: {t:g} ({reason})", highlight=False, markup=False, soft_wrap=True)
    console.print(f"written: {csv}, {png}", highlight=False, markup=False, soft_wrap=True)
    if train is not None and train.train_steps > 0:
        pred = run_probe(problem, base, train, table["t"].tolist(), table, n_eval=train.groups * train.group_size,
                         seed=seed, batch_size=batch, show_progress=show_progress)
        probe_csv = write_table(pred, out_dir / "probe.csv")
        bt, breason = recommend_budget_t(pred)
        console.print(f"\nlearning probe, {train.train_steps} steps ({PROBE_NOTE}):", highlight=False, markup=False,
                      soft_wrap=True)
        console.print(pred.drop(columns=["seconds"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
                      highlight=False, markup=False, soft_wrap=True)
        console.print(f"recommended t at {train.train_steps} steps: {bt:g} ({breason})", highlight=False,
                      markup=False, soft_wrap=True)
        console.print(f"written: {probe_csv}", highlight=False, markup=False, soft_wrap=True)
    return table
