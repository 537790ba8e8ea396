"""Generalized rejection sampling (GRS) and the reshaped rewards it implies (paper Lemma 2.3).

Each rule maps a reward vector r [B] (and group ids [B], e.g. one group per prompt) to a boolean
acceptance mask. Accepted samples follow p(x) ∝ p̄(x) E[A(x)], i.e. the KL-regularised optimum
p ∝ p̄ exp(r̂/α) with reshaped reward r̂ = α log E[A(x)] + const:

=============  ===========================================  ================================
rule           acceptance A                                  reshaped reward r̂
=============  ===========================================  ================================
rs, bound B    u < exp((r - B)/α), B known before sampling   r (exact; every r must be <= B)
rs, no bound   u < exp((r - max r)/α), max over the round    ≈ r (biased near the top: the
                                                             round's best is always kept;
                                                             exact r̂: reshaped_reward_rejection_batchmax)
bon            best of its group of N                         α (N-1) log F(r)
topk           among the K best of its group of M             α log Σ_{j<K} C(M-1,j)(1-F)^j F^(M-1-j)
threshold      r >= τ                                         0 above τ, -inf below
=============  ===========================================  ================================

Rejection sampling is exact only with a bound fixed before sampling (``GRSConfig.bound``, the
CLI's ``--reward-max``): with the round's own maximum as the bound the best candidate is always
accepted, so P(accept | x) ∝ e^{r/α} fails at the top of the batch (r ~ N(0, 1), 256 candidates,
α = 0.5: accepted mean 1.72 where the tilt's is 2.00). A reward above a declared bound is refused
(:class:`~pgraft.core.errors.FieldError` naming ``bound``), since it would break the exactness.

F is the CDF of r under the current model p̄ (estimated empirically). Ties are broken uniformly
at random with the explicit generator, so decisions are reproducible and unbiased. The bon/topk
column assumes a continuous reward law; with ties (invalid samples all scoring 0, discrete rewards)
the reshaped rewards also depend on F₋ = P(R < r) and take the tie-exact forms of
:func:`reshaped_reward_best_of_n` / :func:`reshaped_reward_top_k` (``cdf_below``), of which the
column is the limit F₋ -> F. Derivations: docs/derivations.md, "GRS acceptance rules and their
reshaped rewards".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import FieldError, RewardError


# ----------------------------------------------------------------------------- validation
def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {type(rewards).__name__} "
                         f"of shape {getattr(rewards, 'shape', None)}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: GRS needs at least one candidate")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise RewardError(f"rewards contain {int(bad.sum())} non-finite value(s), first at index {first}: "
                         f"{rewards[first].item()} (rewards must map invalid samples to a finite value)")
    return rewards.double()


def _check_groups(groups: torch.Tensor | None, n: int) -> torch.Tensor:
    if groups is None:
        return torch.zeros(n, dtype=torch.long)
    groups = torch.as_tensor(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) like rewards, got {tuple(groups.shape)}")
    return groups.long().cpu()


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise FieldError("alpha", f"must be a finite number > 0, got {alpha!r}")
    return float(alpha)


# ----------------------------------------------------------------------------- ranking
def rank_within_groups(rewards: torch.Tensor, groups: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank of each sample inside its group, 0 = highest reward. Shape [B].

    Ties are broken uniformly at random: the stable sort runs on a uniform random permutation, so
    every order of a set of tied samples is equally likely (the tie-exact reshaped rewards rely on it).
    """
    r = _check_rewards(rewards).cpu()
    g = _check_groups(groups, len(r))
    perm = torch.randperm(len(r), generator=generator)
    m = block_size(g)
    if m is not None:  # G contiguous groups of M: sort each row of r.view(G, M), the same ranks
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(r))
        by_draw = torch.argsort(inv.view(-1, m), dim=1)  # row order by position in the permutation
        order = by_draw.gather(1, torch.sort(-r.view(-1, m).gather(1, by_draw), dim=1, stable=True).indices)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(m).expand_as(order).contiguous())
        return ranks.flatten()
    # stable sorts: by reward (desc) on a random permutation, then by group -> random tie-break
    order = perm[torch.sort(-r[perm], stable=True).indices]
    order = order[torch.sort(g[order], stable=True).indices]
    sorted_groups = g[order]
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    pos = torch.arange(len(r))
    group_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    ranks = torch.empty_like(pos)
    ranks[order] = pos - group_start
    return ranks


def group_sizes(groups: torch.Tensor) -> torch.Tensor:
    """Size of each sample's group, shape [B]."""
    m = block_size(groups)
    if m is not None:
        return torch.full_like(groups, m)
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    return counts[inverse]


def block_size(groups: torch.Tensor) -> int | None:
    """M when ``groups`` is G contiguous blocks of M equal ids, increasing from block to block (the
    round loop's layout, ``arange(G * M) // M``), else None. Such groups are a ``view(G, M)``:
    the rules then sort rows instead of the whole batch (same decisions, a fraction of the time)."""
    n = len(groups)
    if n == 0:
        return None
    differs = (groups != groups[0]).nonzero()
    m = int(differs[0]) if len(differs) else n
    if n % m:
        return None
    blocks = groups.view(-1, m)
    if not bool((blocks == blocks[:, :1]).all()) or not bool((blocks[1:, 0] > blocks[:-1, 0]).all()):
        return None
    return m


# ----------------------------------------------------------------------------- rules
def _check_bound(bound: float | None) -> float | None:
    if bound is None:
        return None
    if isinstance(bound, bool) or not (isinstance(bound, (int, float)) and math.isfinite(bound)):
        raise FieldError("bound", f"must be a finite number (a known upper bound of the reward) or None, got {bound!r}")
    return float(bound)


def check_below_bound(rewards: torch.Tensor, bound: float) -> None:
    """Refuse rewards [B] above ``bound``: exact rejection sampling needs every r <= bound. The
    :class:`~pgraft.core.errors.FieldError` names ``bound`` (the CLI's ``--reward-max``), the
    largest reward seen and how many exceed it."""
    top = float(rewards.max())
    if top > bound:
        over = int((rewards > bound).sum())
        detail = (f"the largest reward of this batch, {top:.6g} ({over} of {len(rewards)} above), exceeds the declared "
                  f"bound {bound:g}: rejection sampling is exact only when every reward is <= the bound; start again "
                  "with a true upper bound of the reward, or --reward-max inf for the (biased) batch-max bound")
        raise FieldError("bound", detail, f"reward above its bound: {detail}")


def accept_rejection(rewards: torch.Tensor, alpha: float, groups: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, bound: float | None = None) -> torch.Tensor:
    """Rejection sampling: accept each candidate with prob exp((r - b)/α). Returns the mask [B].

    ``bound`` given (a float B known before sampling, every r <= B): b = B, the decisions are
    independent and P(accept | x) = e^{(r(x) - B)/α} ∝ e^{r/α} exactly, whatever the batch;
    a reward above B raises :class:`~pgraft.core.errors.FieldError` (:func:`check_below_bound`).
    ``bound=None``: b = max r over the whole batch (``groups=None``) or per group. The best
    candidate is then always accepted and P(accept | x) = E[min(1, e^{(r - M')/α})], M' the max of
    the others: below e^{r/α}'s proportion near the top, a biased tilt
    (:func:`reshaped_reward_rejection_batchmax`; docs/derivations.md). Log space: any reward scale is safe.
    """
    alpha = _check_alpha(alpha)
    bound = _check_bound(bound)
    r = _check_rewards(rewards).cpu()
    u = torch.rand(len(r), generator=generator, dtype=torch.float64)
    if bound is not None:  # exact: one bound known before sampling
        check_below_bound(r, bound)
        return torch.log(u) < (r - bound) / alpha
    if groups is None:  # one bound for the whole batch
        return torch.log(u) < (r - r.max()) / alpha
    g = _check_groups(groups, len(r))
    m = block_size(g)
    if m is not None:
        return torch.log(u) < ((r.view(-1, m) - r.view(-1, m).amax(1, keepdim=True)) / alpha).flatten()
    _, inverse = torch.unique(g, return_inverse=True)
    gmax = torch.full((int(inverse.max()) + 1,), -math.inf, dtype=r.dtype).scatter_reduce(
        0, inverse, r, reduce="amax")
    log_accept = (r - gmax[inverse]) / alpha
    return torch.log(u) < log_accept


def accept_top_k(rewards: torch.Tensor, k: int, groups: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep the ``k`` highest rewards of each group (ties at random)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    g = _check_groups(groups, len(rewards) if isinstance(rewards, torch.Tensor) and rewards.ndim == 1 else 0)
    smallest = int(group_sizes(g).min()) if len(g) else 0
    if k > smallest:
        raise ValueError(f"k={k} exceeds the smallest group size M={smallest} (need K <= M)")
    return rank_within_groups(rewards, g, generator) < k


def accept_best_of_n(rewards: torch.Tensor, groups: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep the single best sample of each group (group size = N)."""
    return rank_within_groups(rewards, groups, generator) < 1


def accept_threshold(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep every sample with r >= threshold."""
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return _check_rewards(rewards).cpu() >= threshold


# ----------------------------------------------------------------------------- config + registry
@dataclass(frozen=True)
class GRSConfig:
    """Which GRS rule to apply. ``k`` is used by ``topk``, ``alpha`` and ``bound`` by ``rs``,
    ``threshold`` by ``threshold``.

    ``bound``: an upper bound of the reward known before sampling (``--reward-max``). With it ``rs``
    is exact (accept with prob exp((r - bound)/α), a reward above it is refused); None (the
    default, and every config saved before the field existed) bounds by the round's best reward,
    the biased batch-max approximation (module docstring)."""

    rule: str = "topk"
    alpha: float = 1.0
    k: int = 1
    threshold: float = 0.0
    bound: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            message = f"unknown GRS rule {self.rule!r}; choose from {sorted(RULES)}"
            raise FieldError("rule", message, message)
        _check_alpha(self.alpha)
        if not isinstance(self.k, int) or self.k < 1:
            raise FieldError("k", f"must be a positive integer, got {self.k!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise FieldError("threshold", f"must be finite, got {self.threshold!r}")
        object.__setattr__(self, "bound", _check_bound(self.bound))


RuleFn = Callable[[torch.Tensor, torch.Tensor, GRSConfig, "torch.Generator | None"], torch.Tensor]

RULES: dict[str, RuleFn] = {
    # exact with a bound known before sampling; without one, the round's maximum (one bound for the
    # whole round, every condition at once): the batch-max approximation
    "rs": lambda r, g, c, gen: accept_rejection(r, c.alpha, None, gen, c.bound),
    "bon": lambda r, g, c, gen: accept_best_of_n(r, g, gen),
    "topk": lambda r, g, c, gen: accept_top_k(r, c.k, g, gen),
    "threshold": lambda r, g, c, gen: accept_threshold(r, c.threshold),
}


def accept(rewards: torch.Tensor, groups: torch.Tensor | None, config: GRSConfig,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the configured GRS rule; returns the boolean acceptance mask [B]."""
    groups = _check_groups(groups, len(_check_rewards(rewards)))
    return RULES[config.rule](rewards, groups, config, generator)


# ----------------------------------------------------------------------------- reshaped rewards
def empirical_cdf(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """F(v) = P_{R ~ reference}(R <= v), the reward CDF under p̄ estimated from ``reference``."""
    ref = torch.sort(_check_rewards(reference)).values
    return torch.searchsorted(ref, values.double(), right=True).double() / len(ref)


def empirical_cdf_below(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """F₋(v) = P(R < v) where v is an atom of ``reference`` (it occurs at least twice), else F(v).

    A value seen more than once in the sample is a genuine tie (invalid molecules all scoring 0,
    rounded rewards; a continuous reward law repeats a value with probability 0). A value seen
    once is treated as a point of a continuous law, F₋ = F, so tie-free samples give exactly the
    continuous reshaped rewards; either reading of a singleton differs from the other by O(N/B).
    """
    ref = torch.sort(_check_rewards(reference)).values
    v = values.double()
    at_most = torch.searchsorted(ref, v, right=True)
    below = torch.searchsorted(ref, v, right=False)
    return torch.where(at_most - below > 1, below, at_most).double() / len(ref)


def _check_cdfs(cdf: torch.Tensor, cdf_below: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    f = torch.as_tensor(cdf).double()
    if cdf_below is None:
        return f, None
    f_below = torch.as_tensor(cdf_below).double()
    if f_below.shape != f.shape:
        raise ValueError(f"cdf_below must have the shape of cdf {tuple(f.shape)}, got {tuple(f_below.shape)}")
    bad = f_below > f
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(f"cdf_below must be <= cdf (F₋ = P(R < r) <= F = P(R <= r)); at index {i} "
                         f"cdf_below={f_below.flatten()[i].item()} > cdf={f.flatten()[i].item()}")
    return f.clamp(0.0, 1.0), f_below.clamp(0.0, 1.0)


def reshaped_reward_rejection(rewards: torch.Tensor) -> torch.Tensor:
    """Rejection sampling with a bound B known before sampling keeps the reward: r̂ = r
    (P(accept | r) = e^{(r - B)/α}, so α log P = r - B, a constant off r)."""
    return _check_rewards(rewards).clone()


def reshaped_reward_rejection_batchmax(rewards: torch.Tensor, alpha: float, n: int,
                                       reference: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-max rejection sampling (``rs`` without a bound, a round of ``n`` candidates): the exact
    r̂ = α log P(accept | r), shape [B] like ``rewards``.

    The bound is max(r, M'), M' the largest of the n - 1 other rewards, P(M' <= v) = F(v)^(n-1):

        P(accept | r) = E[min(1, e^{(r - M')/α})] = F(r)^(n-1) + e^{r/α} Σ_{v_j > r} w_j e^{-v_j/α},

    over the distinct values v_j of ``reference`` (the rewards under p̄; default ``rewards``), with
    w_j = F(v_j)^(n-1) - F(v_{j-1})^(n-1) the law of M'. For r far below the batch's top this is
    ∝ e^{r/α} (r̂ = r + const), near the top it is larger (1 for r above every v_j): the bias of
    the batch-max bound. O(R log R) for R reference rewards (suffix log-sum-exp).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    alpha = _check_alpha(alpha)
    r = _check_rewards(rewards)
    if n == 1:
        return torch.zeros_like(r)  # alone in its batch: always the maximum, always kept
    values, counts = torch.unique(_check_rewards(r if reference is None else reference), return_counts=True)
    log_cdf = torch.log(torch.cumsum(counts, 0).double() / counts.sum())  # log F(v_j), increasing
    log_mass = (n - 1) * log_cdf  # log P(M' <= v_j)
    below = torch.cat([torch.full((1,), -math.inf, dtype=torch.float64), log_mass[:-1]])
    log_w = log_mass + torch.log1p(-torch.exp(below - log_mass))  # log P(M' = v_j)
    terms = log_w - values / alpha
    suffix = torch.flip(torch.logcumsumexp(torch.flip(terms, [0]), 0), [0])  # log Σ_{j' >= j}
    suffix = torch.cat([suffix, torch.full((1,), -math.inf, dtype=torch.float64)])
    above = torch.searchsorted(values, r, right=True)  # first j with v_j > r
    at_most = torch.where(above > 0, log_mass[(above - 1).clamp_min(0)], torch.full_like(r, -math.inf))
    log_p = torch.logaddexp(at_most, r / alpha + suffix[above])
    return alpha * log_p


def reshaped_reward_best_of_n(cdf: torch.Tensor, n: int, alpha: float = 1.0,
                              cdf_below: torch.Tensor | None = None) -> torch.Tensor:
    """Best-of-N: r̂ = α log P(accept | r); ``cdf`` holds F(r) = P(R <= r) per sample.

    Continuous rewards (``cdf_below=None``): P = F^(N-1), r̂ = α (N-1) log F.
    With ties, ``cdf_below`` holds F₋(r) = P(R < r) and the uniform tie-break of
    :func:`accept_best_of_n` gives P = (F^N - F₋^N) / (N (F - F₋)), evaluated as the equal
    polynomial (1/N) Σ_{i<N} F^i F₋^(N-1-i) in log space (no 0/0 at F₋ = F, whose value is
    F^(N-1)). docs/derivations.md, "Ties". N = 1 gives 0 for every F, F = 0 included.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    alpha = _check_alpha(alpha)
    f, f_below = _check_cdfs(cdf, cdf_below)
    if n == 1:
        return torch.zeros_like(f)  # the single candidate is always kept (0 * log 0 would be NaN at F = 0)
    if f_below is None:
        return alpha * (n - 1) * torch.log(f)
    i = torch.arange(n, dtype=torch.float64)
    terms = torch.xlogy(i, f[..., None]) + torch.xlogy(n - 1 - i, f_below[..., None])
    return alpha * (torch.logsumexp(terms, dim=-1) - math.log(n))


def reshaped_reward_top_k(cdf: torch.Tensor, m: int, k: int, alpha: float = 1.0,
                          cdf_below: torch.Tensor | None = None) -> torch.Tensor:
    """Top-K of M: r̂ = α log P(accept | r), ``cdf`` = F(r) = P(R <= r) per sample.

    Continuous rewards (``cdf_below=None``): x is kept iff at most K-1 of the other M-1 beat it,
    P = Σ_{j<K} C(M-1, j) (1-F)^j F^(M-1-j).
    With ties, ``cdf_below`` = F₋(r) = P(R < r); each other candidate is above (a = 1-F), tied
    (b = F-F₋) or below (c = F₋), and with the uniform tie-break of :func:`accept_top_k` a sample
    with j above and l tied is kept with probability min(1, (K-j)/(l+1)):
    P = Σ_{j<K} Σ_l (M-1)!/(j! l! (M-1-j-l)!) a^j b^l c^(M-1-j-l) min(1, (K-j)/(l+1)).
    b = 0 (F₋ = F) leaves the l = 0 terms, the continuous formula. docs/derivations.md, "Ties".
    Both are log-sum-exps of log terms (xlogy: 0 log 0 = 0), stable for F near 0 or 1.
    """
    if not (isinstance(m, int) and isinstance(k, int) and 1 <= k <= m):
        raise ValueError(f"need integers 1 <= k <= m, got k={k!r}, m={m!r}")
    alpha = _check_alpha(alpha)
    f, f_below = _check_cdfs(cdf, cdf_below)
    if f_below is None:
        f = f.clamp(0.0, 1.0).flatten()
        j = torch.arange(k, dtype=torch.float64)
        log_binom = torch.lgamma(torch.tensor(m, dtype=torch.float64)) - torch.lgamma(j + 1) - torch.lgamma(m - j)
        terms = log_binom + torch.xlogy(j, 1 - f[:, None]) + torch.xlogy(m - 1 - j, f[:, None])
        return alpha * torch.logsumexp(terms, dim=1).view(torch.as_tensor(cdf).shape)
    shape = f.shape
    a, b, c = (1 - f).flatten()[:, None], (f - f_below).flatten()[:, None], f_below.flatten()[:, None]
    log_fact = torch.lgamma(torch.arange(1, m + 1, dtype=torch.float64))  # log(i!) for i = 0..m-1
    per_j = []
    for j in range(k):  # one [B, M-j] slab per j keeps memory at O(B M)
        l = torch.arange(m - j, dtype=torch.float64)
        rest = m - 1 - j - l
        log_multinomial = log_fact[m - 1] - log_fact[j] - log_fact[l.long()] - log_fact[rest.long()]
        log_tie_break = torch.log(torch.clamp((k - j) / (l + 1), max=1.0))
        terms = (log_multinomial + log_tie_break + torch.xlogy(torch.tensor(float(j)), a)
                 + torch.xlogy(l, b) + torch.xlogy(rest, c))
        per_j.append(torch.logsumexp(terms, dim=1))
    return alpha * torch.logsumexp(torch.stack(per_j, 1), dim=1).view(shape)


def reshaped_reward_threshold(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """Threshold rule: r̂ = 0 where r >= τ, -inf below."""
    r = _check_rewards(rewards)
    return torch.where(r >= threshold, torch.zeros_like(r), torch.full_like(r, -math.inf))


def reshaped_reward(rewards: torch.Tensor, config: GRSConfig, group_size: int,
                    reference: torch.Tensor | None = None) -> torch.Tensor:
    """The reshaped reward r̂ of ``config``'s rule for samples with rewards ``rewards``.

    ``rs`` gives r: exact with ``config.bound``; without a bound it is the large-round limit of the
    batch-max rule, whose exact r̂ depends on the round size (:func:`reshaped_reward_rejection_batchmax`).
    ``reference``: rewards of samples from p̄ used for the CDF (defaults to ``rewards``). Values
    repeated in it are atoms of the reward law and get the tie-exact r̂
    (:func:`empirical_cdf_below`); a tie-free reference gives the continuous formulas.
    """
    if config.rule == "rs":
        return reshaped_reward_rejection(rewards)
    if config.rule == "threshold":
        return reshaped_reward_threshold(rewards, config.threshold)
    ref = rewards if reference is None else reference
    cdf, cdf_below = empirical_cdf(ref, rewards), empirical_cdf_below(ref, rewards)
    if torch.equal(cdf, cdf_below):
        cdf_below = None  # no ties: the continuous formula, bit for bit as before
    if config.rule == "bon":
        return reshaped_reward_best_of_n(cdf, group_size, config.alpha, cdf_below)
    return reshaped_reward_top_k(cdf, group_size, config.k, config.alpha, cdf_below)
