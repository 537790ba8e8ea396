"""Sampling of the unconditional image flow: a base alone, or noise flow -> frozen base
(:func:`pgraft.core.noise_correction.sample_corrected`), its counted FLOPs per image, and image grids.

    sample_images     z ~ N(0, I) [-> noise flow] -> base sampler -> images, for one :class:`SamplerSpec`
    flops_per_image   FLOPs/image of a sampler configuration, counted (not estimated)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgraft.core.errors import UsageError
from pgraft.core.inversion import sampler_flops
from pgraft.core.noise_correction import FlowBase, sample_corrected
from pgraft.core.progress import progress_bar
from pgraft.core.sampling import FLOW_STEP_EVALS, FLOW_STEPS
from pgraft.core.schedules import flow_times
from pgraft.core.state import atomic_write, module_device

from .model import FlowUNet


def check_sampler(sampler: str) -> None:
    """Refuse (one line) an ODE sampler name that :data:`pgraft.core.sampling.FLOW_STEPS` does not have."""
    if sampler not in FLOW_STEPS:
        raise UsageError(f"unknown sampler {sampler!r}; choose from {sorted(FLOW_STEPS)}")


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler configuration: base ``steps`` of ``sampler``, optionally preceded by
    ``noise_steps`` of ``noise_sampler`` through the noise-correction flow (0 = plain base)."""

    steps: int
    sampler: str = "euler"
    noise_steps: int = 0
    noise_sampler: str = "euler"

    def __post_init__(self) -> None:
        check_sampler(self.sampler)
        check_sampler(self.noise_sampler)
        if self.steps < 1 or self.noise_steps < 0:
            raise UsageError(f"need steps >= 1 and noise_steps >= 0, got {self.steps}, {self.noise_steps}")

    @property
    def corrected(self) -> bool:
        return self.noise_steps > 0

    @property
    def label(self) -> str:
        base = f"{self.sampler}-{self.steps}"
        return f"corrected({self.noise_sampler}-{self.noise_steps})+{base}" if self.corrected else f"base {base}"


@torch.no_grad()
def sample_images(spec: SamplerSpec, base: FlowUNet, n: int, noise_model: FlowUNet | None = None, seed: int = 0,
                  batch_size: int = 250, show_progress: bool = True) -> torch.Tensor:
    """n images [n, C, H, W] (clamped to [-1, 1]) from z ~ N(0, I) [-> noise flow] -> base sampler.

    The noise flow integrates its own ODE from s = 1 (its N(0, I) prior) to s = 0 (the inverted-noise
    law); its output is the base's x_1 (:func:`pgraft.core.noise_correction.sample_corrected`, batched here).
    Runs where ``base`` lives (the noise flow must be there too); z is drawn on the CPU, so a seed
    gives the same starting noise on any device. Returns CPU tensors.
    """
    if spec.corrected and noise_model is None:
        raise UsageError(f"sampler {spec.label} needs a noise-correction model")
    g = torch.Generator().manual_seed(seed)
    device = module_device(base)
    flow = FlowBase(base, flow_times(spec.steps), tuple(base.image_shape), FLOW_STEPS[spec.sampler])
    out = []
    with progress_bar(n, spec.label, show_progress) as advance:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = torch.randn((m, *base.image_shape), generator=g).to(device)
            x = sample_corrected(noise_model if spec.corrected else None, flow, z, spec.noise_steps,
                                 FLOW_STEPS[spec.noise_sampler])
            out.append(x.clamp(-1, 1).cpu())
            advance(m)
    return torch.cat(out)


def sample_base(base: FlowUNet, n: int, steps: int, sampler: str = "euler", seed: int = 0,
                show_progress: bool = True) -> torch.Tensor:
    """Plain base sampling: z ~ N(0, I) -> ``steps`` of ``sampler``; [n, C, H, W]."""
    return sample_images(SamplerSpec(steps, sampler), base, n, None, seed, show_progress=show_progress)


def flops_per_image(spec: SamplerSpec, base: FlowUNet, noise_model: FlowUNet | None = None) -> int:
    """Counted FLOPs/image: base steps x evals/step x FLOPs(base eval) + the same for the noise flow."""
    example = torch.zeros(1, *base.image_shape, device=module_device(base))
    total = sampler_flops(base, example, spec.steps, FLOW_STEP_EVALS[spec.sampler])
    if spec.corrected:
        if noise_model is None:
            raise UsageError(f"sampler {spec.label} needs a noise-correction model to count its FLOPs")
        total += sampler_flops(noise_model, example, spec.noise_steps, FLOW_STEP_EVALS[spec.noise_sampler])
    return total


def images_to_grid(images: torch.Tensor, path: str | Path, ncol: int = 8) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid (1-pixel gaps)."""
    from PIL import Image

    from .data import unit_to_uint8

    x = unit_to_uint8(images).numpy()
    n, c, h, w = x.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = np.full((c, nrow * (h + 1) + 1, ncol * (w + 1) + 1), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    image = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
