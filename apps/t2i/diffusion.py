"""The embedded world's sampler step: DDIM(eta) with the x_0 prediction clipped to the data range.

x0_hat = clip((x_t - sqrt(1-a_t) eps) / sqrt(a_t), -1, 1),  eps' = (x_t - sqrt(a_t) x0_hat) / sqrt(1-a_t),
x_next = sqrt(a_n) x0_hat + sqrt(1 - a_n - sigma^2) eps' + sigma z,
sigma  = eta sqrt((1-a_n)/(1-a_t)) sqrt(1 - a_t/a_n)                    (Song et al. 2021, eq. 12)

Why: the cosine schedule reaches abar(1) = 1e-5, so at the first steps x0_hat divides the eps error
by sqrt(abar) ~ 3e-3; a CPU-sized model's small eps error (MSE ~0.1 at t = 1, measured) then blows
the state up to |x| ~ 500. Pixels live in [-1, 1] (space-to-depth is a permutation), so clipping
x0_hat — diffusers' ``clip_sample`` — is exact for the data and removes the blow-up. Latent (SD)
pipelines keep the core's unclipped :func:`pgraft.core.sampling.ddim_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pgraft.core.sampling import StepFn, randn_like, time_vector


def clipped_ddim_step(alpha_bar: Callable[[torch.Tensor | float], torch.Tensor], eta: float = 1.0,
                      clip: float = 1.0) -> StepFn:
    """DDIM step with x0_hat clipped to [-clip, clip]; same signature as the core steps."""
    if eta < 0 or clip <= 0:
        raise ValueError(f"need eta >= 0 and clip > 0, got eta={eta}, clip={clip}")

    def step(model, x, t, t_next, cond=None, generator=None):
        a_t, a_n = float(alpha_bar(t)), float(alpha_bar(t_next))
        eps = model(x, time_vector(t, x), cond)
        x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-clip, clip)
        eps = (x - a_t**0.5 * x0) / max(1 - a_t, 1e-12) ** 0.5
        sigma = eta * ((1 - a_n) / (1 - a_t)) ** 0.5 * max(1 - a_t / a_n, 0.0) ** 0.5 if a_t < 1 else 0.0
        mean = a_n**0.5 * x0 + max(1 - a_n - sigma**2, 0.0) ** 0.5 * eps
        return mean + sigma * randn_like(x, generator) if sigma > 0 else mean

    return step
