"""Toy rewards: plain callables ``reward(x, cond) -> Tensor[B]`` on samples x [B, D]."""

from __future__ import annotations

import torch


def linear_reward(x: torch.Tensor, cond=None) -> torch.Tensor:
    """r(x) = x_1: with a Gaussian base N(m, s^2), RS with temperature alpha gives N(m + s^2/alpha, s^2)."""
    return x[:, 0].double()


def ring_reward(x: torch.Tensor, cond=None) -> torch.Tensor:
    """r(x) = -(||x|| - 2)^2: prefers samples on the circle of radius 2."""
    return -((x.double().norm(dim=1) - 2.0) ** 2)


REWARDS = {"x": linear_reward, "ring": ring_reward}

# A true upper bound of a reward, known before sampling (``--rule rs``'s default --reward-max):
# ring is -(distance to the circle)^2 <= 0; x is unbounded (no entry: rs bounds by the batch maximum).
REWARD_MAX = {"ring": 0.0}
