"""Exact GRS targets on a pool of base samples, and the 1-D Wasserstein-1 distance to them."""

from __future__ import annotations

import torch

from pgraft.core.grs import GRSConfig, reshaped_reward


def wasserstein_1d(x: torch.Tensor, y: torch.Tensor, y_weights: torch.Tensor | None = None) -> float:
    """W1 = ∫ |F_x(z) - F_y(z)| dz between samples ``x`` and (weighted) samples ``y`` (1-D)."""
    x = x.double().flatten()
    y = y.double().flatten()
    wy = torch.ones_like(y) if y_weights is None else y_weights.double().flatten()
    if wy.sum() <= 0:
        raise ValueError("target weights sum to zero")
    support = torch.sort(torch.cat([x, y])).values
    fx = torch.searchsorted(torch.sort(x).values, support, right=True).double() / len(x)
    order = torch.argsort(y)
    cw = torch.cumsum(wy[order], 0) / wy.sum()
    idx = torch.searchsorted(y[order], support, right=True)
    fy = torch.where(idx > 0, cw[(idx - 1).clamp_min(0)], torch.zeros_like(support))
    return float((torch.abs(fx - fy)[:-1] * torch.diff(support)).sum())


def acceptance_weights(rewards: torch.Tensor, config: GRSConfig, group_size: int,
                       reference: torch.Tensor | None = None) -> torch.Tensor:
    """E[A(x)] ∝ exp(r̂(x)/α) for each sample (Lemma 2.3), normalised to max 1."""
    r_hat = reshaped_reward(rewards, config, group_size, reference)
    alpha = config.alpha if config.rule in ("bon", "topk", "rs") else 1.0
    log_w = r_hat / alpha
    return torch.exp(log_w - log_w.max())


def conditional_weights(tail_rewards: torch.Tensor, config: GRSConfig, group_size: int,
                        reference: torch.Tensor) -> torch.Tensor:
    """P-GRAFT: h(x_t) = E[A | x_t] from ``tail_rewards`` [P, K] (K base tails per x_t)."""
    p, k = tail_rewards.shape
    w = acceptance_weights(tail_rewards.flatten(), config, group_size, reference).view(p, k)
    return w.mean(1)
