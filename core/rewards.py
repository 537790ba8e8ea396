"""The one rule every reward follows, whatever its source (an app's built-in, a user's Python
function, a reward server): a reward that raises stops the run with one line naming it, and a
non-finite score is refused, naming the reward and how many scores were not finite, unless the
user opted in to a stated replacement value (``--nonfinite-reward VALUE`` where an app offers it).

A silent replacement (NaN counted as 0) would let a broken reward steer the acceptance step with
no trace; an explicit one is recorded in the run's config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import RewardError, RunError


def finite_scores(scores: Any, reward: str, nonfinite: float | None = None) -> torch.Tensor:
    """``scores`` as a float64 tensor after the non-finite rule: with ``nonfinite`` None a NaN or
    ±inf score raises :class:`~pgraft.core.errors.RewardError` (one line: the reward, the count,
    the first bad value and its index); else every such score becomes ``nonfinite``."""
    values = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    bad = ~torch.isfinite(values)
    if not bad.any():
        return values
    if nonfinite is None:
        first = int(bad.nonzero()[0][0]) if values.ndim else 0
        shown = values.reshape(-1)[first].item()
        raise RewardError(f"reward {reward!r} returned {int(bad.sum())} non-finite score(s) of {values.numel()} "
                          f"(first: {shown} at index {first}); fix the reward, or pass --nonfinite-reward VALUE to "
                          "score such samples VALUE")
    if not math.isfinite(nonfinite):
        raise RewardError(f"the replacement for non-finite scores of reward {reward!r} must be finite, got {nonfinite}")
    return torch.where(bad, torch.full_like(values, float(nonfinite)), values)


def call_reward(fn: Callable[..., Any], reward: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an exception other than a refusal becomes a
    :class:`~pgraft.core.errors.RewardError` naming the reward and the error (one line)."""
    try:
        return fn(*args, **kwargs)
    except RunError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's reward may raise anything
        text = " ".join(str(err).split())[:300] or "no message"
        raise RewardError(f"reward {reward!r} failed: {type(err).__name__}: {text}") from err
