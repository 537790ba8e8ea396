"""Time grids, noise schedules and the P-GRAFT split.

Convention used across pgraft: every sampler walks a 1-D float grid ``times`` that *descends*
from 1.0 (pure noise, "T") to 0.0 (data). Three forward processes share this clock:

- linear flow (rectified flow): x_s = (1 - s) x_0 + s eps, velocity v = eps - x_0;
- VP diffusion: x_s = sqrt(abar(s)) x_0 + sqrt(1 - abar(s)) eps, the model predicts eps;
- masking (absorbing) discrete diffusion: each maskable token is masked independently with
  probability ``mask_rate(s) = s``.

P-GRAFT (paper Sec. 3) fine-tunes only the head of this grid, T -> t, and leaves the tail
t -> 0 to the frozen base model; :func:`split_times` cuts a grid there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import FieldError

SplitBy = Literal["fraction", "time", "index"]


def _check_steps(n_steps: int) -> None:
    if not isinstance(n_steps, int) or n_steps < 1:
        raise FieldError("n_steps", f"must be a positive integer, got {n_steps!r}",
                         f"n_steps must be a positive integer, got {n_steps!r}")


def flow_times(n_steps: int) -> torch.Tensor:
    """Uniform grid 1 -> 0 with ``n_steps`` Euler steps; shape [n_steps + 1], float64."""
    _check_steps(n_steps)
    return torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)


def masking_times(n_steps: int) -> torch.Tensor:
    """Grid for masking diffusion; identical to :func:`flow_times` (mask rate is linear in t)."""
    return flow_times(n_steps)


def vp_times(n_steps: int) -> torch.Tensor:
    """Grid for VP diffusion (DDIM-style); identical spacing, the schedule lives in ``abar``."""
    return flow_times(n_steps)


def mask_rate(t: torch.Tensor | float) -> torch.Tensor | float:
    """Fraction of maskable tokens that are masked at time t (linear schedule, MDLM/LLaDA)."""
    return t


def cosine_alpha_bar(t: torch.Tensor | float, s: float = 0.008, min_value: float = 1e-5) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule abar(t) = cos^2(((t+s)/(1+s)) pi/2) / cos^2((s/(1+s)) pi/2).

    Clamped to [min_value, 1] so that ``t = 1`` keeps a finite x_0-prediction.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (f / f0).clamp(min_value, 1.0)


def linear_alpha_bar(t: torch.Tensor | float, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """Continuous-time DDPM (VP-SDE) schedule abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t**2))


@dataclass(frozen=True)
class TimeSplit:
    """A grid cut at ``index``: ``head = times[:index+1]`` (T -> t), ``tail = times[index:]`` (t -> 0).

    The two share the split point ``t = times[index]``; their steps partition the grid's steps.
    ``index == 0`` leaves nothing to fine-tune; ``index == len(times) - 1`` is plain GRAFT.
    """

    head: torch.Tensor
    tail: torch.Tensor
    index: int
    t: float


def split_index(times: torch.Tensor, at: float | int, by: SplitBy = "fraction") -> int:
    """Index of the split point in ``times`` (see :func:`split_times`)."""
    if times.ndim != 1 or len(times) < 2:
        raise ValueError(f"times must be a 1-D grid with at least 2 points, got shape {tuple(times.shape)}")
    n_steps = len(times) - 1
    if by == "index":
        if not isinstance(at, int) or not 0 <= at <= n_steps:
            raise ValueError(f"split index must be an int in [0, {n_steps}], got {at!r}")
        return at
    if by == "fraction":
        if not 0.0 <= float(at) < 1.0:
            raise ValueError(f"split fraction t must be in [0, 1), got {at!r}")
        # t is the share of steps left to the frozen base: t = 0 fine-tunes every step (GRAFT)
        return n_steps - int(round(float(at) * n_steps))
    if by == "time":
        lo, hi = float(times.min()), float(times.max())
        if not lo <= float(at) < hi:
            raise ValueError(f"split time t must be in [{lo}, {hi}), got {at!r}")
        return int(torch.argmin((times - float(at)).abs()).item())
    raise ValueError(f"by must be 'fraction', 'time' or 'index', got {by!r}")


def split_times(times: torch.Tensor, at: float | int, by: SplitBy = "fraction") -> TimeSplit:
    """Cut ``times`` into the fine-tuned head T -> t and the frozen tail t -> 0 (P-GRAFT).

    ``by="fraction"``: ``at`` is the fraction of steps run by the frozen base (0 = GRAFT, 0.25 =
    fine-tune the first 75% of the steps); ``by="time"``: the grid point nearest to time ``at``;
    ``by="index"``: the split point's index in ``times``.
    """
    k = split_index(times, at, by)
    if k == 0:
        raise ValueError(f"split at {at!r} ({by}) leaves the fine-tuned head with no step")
    return TimeSplit(head=times[: k + 1], tail=times[k:], index=k, t=float(times[k]))
