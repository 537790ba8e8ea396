"""A tiny MLP noise predictor eps_theta(x, t) for the toy worlds."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1]; [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ToyDenoiser(nn.Module):
    """MLP on [x, emb(t)] -> eps, ``depth`` hidden layers of width ``hidden`` with SiLU."""

    def __init__(self, dim: int = 1, hidden: int = 128, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        self.time_dim = time_dim
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, self.time_dim)], dim=1))
