"""Closed-form toy worlds: Gaussian mixtures in 1-D and 2-D with exact densities."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture; ``means`` [K, D], ``stds`` [K], ``weights`` [K] (sum 1)."""

    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.means) == len(self.stds) == len(self.weights)) or not self.means:
            raise ValueError("means, stds and weights must have the same non-zero length")
        if abs(sum(self.weights) - 1) > 1e-6 or min(self.weights) <= 0 or min(self.stds) <= 0:
            raise ValueError(f"weights must be positive and sum to 1, stds positive: {self.weights}, {self.stds}")

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, shape [n, D]."""
        comp = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        means = torch.tensor(self.means)[comp]
        stds = torch.tensor(self.stds)[comp][:, None]
        return means + stds * torch.randn(n, self.dim, generator=generator)


MIXTURES: dict[str, GaussianMixture] = {
    "1d": GaussianMixture(means=((-2.0,), (1.5,)), stds=(0.5, 0.5), weights=(0.6, 0.4)),
    "2d": GaussianMixture(means=((-2.0, 0.0), (2.0, 0.0), (0.0, 2.0)), stds=(0.4, 0.4, 0.4),
                          weights=(0.4, 0.3, 0.3)),
}
