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

Recommendation. Write h(X_t) = E[r | X_t], so r = h + e with e uncorrelated with h, and let GRS
raise the mean reward of the accepted samples above the candidates' by S (its selection
differential). P-GRAFT fine-tunes the head on the accepted X_t; at best the head reproduces their
law, and a fresh sample from head + base then has the expected reward of h over the accepted X_t.
Regressing h on r gives slope Cov(h, r) / Var(r) = Var(h) / Var(r) = R^2(t), so among the
accepted samples h rises by about R^2(t) S: the breeder's equation, with R^2 in the role of
heritability. It is exact when h and r are jointly Gaussian (then E[h | r] = mean + R^2 (r -
mean)), and the linear approximation otherwise. So R^2(t) is the fraction of GRAFT's per-round
reward gain (GRAFT is t = 0, R^2 = 1) that P-GRAFT keeps at split t, while a larger t leaves the
head an easier law to learn and keeps more of the sampler, and so the sample, at the frozen base.
The rule of :func:`recommend_t`: the largest t on the grid whose R^2 lower 95% bound is at least
``keep`` = 0.5, i.e. that keeps at least half of the selection's gain with 95% confidence; when no
t qualifies, the smallest t on the grid, saying so.

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

from .progress import make_console, progress_bar
from .sampling import sample
from .schedules import split_index
from .state import cat, index, module_device, repeat_interleave, to_device
from .trainer import GraftProblem, derive_seed, generator_for

COLUMNS = ["t", "t_grid", "n_states", "tails", "conditions", "var_r", "evar", "evar_lo", "evar_hi", "r2", "r2_lo", "r2_hi",
           "F", "p_value", "seconds"]
DEFAULT_GRID = (0.1, 0.25, 0.5, 0.75, 0.9)
BOOTSTRAP = 1000
LEVEL = 0.95
KEEP = 0.5
STATES_PER_CONDITION = 4  # s: states drawn per condition in conditional problems (module docstring)

# seed streams of this module (the last part of generator_for's key; distinct from trainer.Stream)
_HEADS = 1 << 26  # X_T and the base over T -> t, per chunk of states: the same X_T for every t
_TAILS = 1 << 27  # the K tails t -> 0, per t and chunk
_BOOT = 1 << 28  # bootstrap resampling, per t
_CONDS = 1 << 29  # the conditions a conditional diagnosis draws its states for


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
    q = [(1 - level) / 2, (1 + level) / 2]

    def interval(values: np.ndarray) -> tuple[float, float]:
        if np.isnan(values).all():
            return math.nan, math.nan
        lo_, hi_ = np.nanquantile(values, q)
        return float(lo_), float(hi_)

    return {"evar": interval(evar), "r2": interval(r2)}


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
                    states_per_condition: int = STATES_PER_CONDITION) -> pd.DataFrame:
    """The diagnosis table, one row per t of ``t_grid`` (columns :data:`COLUMNS`; see the module
    docstring). Samples with ``base`` on its device, ``batch_size`` rows per sampler call; X_T is
    drawn from the same seeds for every t (common random numbers across the grid). A problem with
    several conditions is diagnosed within conditions (``states_per_condition`` states each)."""
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
            rows.append({"t": t, "t_grid": float(problem.times[k]), "n_states": n_states, "tails": tails,
                         "conditions": int(len(np.unique(groups))),
                         "var_r": est["var_r"], "evar": est["evar"], "evar_lo": ci["evar"][0],
                         "evar_hi": ci["evar"][1], "r2": est["r2"], "r2_lo": ci["r2"][0], "r2_hi": ci["r2"][1],
                         "F": est["F"], "p_value": est["p_value"], "seconds": time.time() - t0})
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- decision and outputs
def recommend_t(table: pd.DataFrame, keep: float = KEEP) -> tuple[float, str]:
    """(t, reason): the largest t whose R^2 lower bound ``r2_lo`` is >= ``keep`` (see the module
    docstring); when none qualifies, the smallest t of the table, and the reason says so."""
    if table.empty:
        raise ValueError("empty diagnosis table")
    ok = table[table["r2_lo"] >= keep]  # NaN bounds never qualify
    if len(ok):
        row = ok.loc[ok["t"].idxmax()]
        return float(row["t"]), (f"largest t with R^2 lower 95% bound {row['r2_lo']:.3f} >= {keep:g}: X_t already "
                                 f"decides >= {keep:.0%} of the reward's variance, so P-GRAFT keeps at least that "
                                 "share of the selection's gain")
    row = table.loc[table["t"].idxmin()]
    best = table.loc[table["r2_lo"].fillna(-math.inf).idxmax()]
    return float(row["t"]), (f"no t on the grid has an R^2 lower 95% bound >= {keep:g} (best: t={best['t']:g}, "
                             f"r2_lo={best['r2_lo']:.3f}); smallest t of the grid, consider plain GRAFT (t = 0) or a "
                             "finer grid below it")


def plot_diagnosis(table: pd.DataFrame, path: str | Path, keep: float = KEEP, recommended: float | None = None,
                   title: str = "") -> Path:
    """Two panels against t: E[Var(r | X_t)] (with Var(r)) and R^2(t), each with its 95% interval,
    the ``keep`` line, and the recommended t when given."""
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
    ax.axhline(keep, color="r", lw=1, ls=":", label=f"keep = {keep:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("R^2 (share of the reward decided at X_t)")
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
                 states_per_condition: int = STATES_PER_CONDITION) -> pd.DataFrame:
    """The body of every ``pgraft <app> diagnose``: measure (on ``device``, default the GPU when torch
    sees one), print the table and ``recommended t: X (reason)``, write ``diagnose.csv`` and
    ``diagnose.png`` to ``out_dir``; returns the table."""
    from .state import default_device

    base = base.eval().requires_grad_(False).to(device if device is not None else default_device())
    table = reward_variance(problem, base, t_grid, n_states, tails, seed, batch, show_progress,
                            states_per_condition=states_per_condition)
    t, reason = recommend_t(table, keep)
    out_dir = Path(out_dir)
    csv = write_table(table, out_dir / "diagnose.csv")
    png = plot_diagnosis(table, out_dir / "diagnose.png", keep, t, title=f"{n_states} states x {tails} tails per t"
                         + ("" if table["conditions"].iloc[0] == 1 else
                            f", within {table['conditions'].iloc[0]} conditions"))
    console = make_console()
    console.print(format_table(table), highlight=False, markup=False, soft_wrap=True)
    console.print(f"recommended t: {t:g} ({reason})", highlight=False, markup=False, soft_wrap=True)
    console.print(f"written: {csv}, {png}", highlight=False, markup=False, soft_wrap=True)
    return table
