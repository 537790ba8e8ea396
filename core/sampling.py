"""One sampler signature for every model kind, and the P-GRAFT split sampler.

A *step* moves a batch from time ``t`` to ``t_next`` (``t > t_next``, clock 1 -> 0):

    step(model, x, t, t_next, cond, generator) -> x_next

and :func:`sample` just folds a step over a grid (k-diffusion style). The P-GRAFT split
sampler is two such calls: fine-tuned head over ``times[:k+1]``, frozen base over ``times[k:]``.

Models used by the built-in steps are called as ``model(x, t_vec, cond)`` with ``t_vec`` a float
tensor of shape [B]; flow models return the velocity, VP models the noise eps, masking models
token logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .state import State, batch_size

StepFn = Callable[[nn.Module, State, float, float, Any, "torch.Generator | None"], State]


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible across devices)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def rand_like(x: torch.Tensor, generator: torch.Generator | None, dtype=torch.float32) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device, dtype=dtype).to(x.device)


def time_vector(t: float, x: State) -> torch.Tensor:
    """Broadcast a scalar time to a [B] float32 tensor on the state's device."""
    ref = x if isinstance(x, torch.Tensor) else next(iter(x.values()))
    return torch.full((batch_size(x),), float(t), device=ref.device, dtype=torch.float32)


@torch.no_grad()
def sample(
    model: nn.Module,
    x: State,
    times: torch.Tensor,
    step: StepFn,
    cond: Any = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    callback: Callable[[int, State], None] | None = None,
) -> State:
    """Integrate ``x`` from ``times[0]`` to ``times[-1]`` with ``step``; a 1-point grid is a no-op.

    ``progress``, if given, is called with 1 after every step (e.g. a rich progress advance);
    ``callback(i, x)`` with the state after step i (the k-diffusion pattern: trajectories,
    previews and diagnostics without a second loop).
    """
    for i, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        x = step(model, x, t, t_next, cond, generator)
        if progress is not None:
            progress(1)
        if callback is not None:
            callback(i, x)
    return x


@dataclass(frozen=True)
class SplitSample:
    """Result of the P-GRAFT sampler: the intermediate state at time ``t`` and the final sample."""

    x_t: State
    x_0: State
    t: float


@torch.no_grad()
def sample_split(
    head: nn.Module,
    base: nn.Module,
    x_T: State,
    times: torch.Tensor,
    index: int,
    step: StepFn,
    cond: Any = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    callback: Callable[[int, State], None] | None = None,
) -> SplitSample:
    """Fine-tuned ``head`` over ``times[:index+1]`` (T -> t), frozen ``base`` over ``times[index:]``.

    With ``index == len(times) - 1`` this is ordinary sampling with ``head`` (GRAFT) and
    ``x_t is x_0``. ``callback(i, x)`` sees every step i of the whole grid (see :func:`sample`).
    """
    if not 0 <= index < len(times):
        raise ValueError(f"split index must be in [0, {len(times) - 1}], got {index}")
    x_t = sample(head, x_T, times[: index + 1], step, cond, generator, progress, callback)
    later = None if callback is None else (lambda i, x: callback(index + i, x))
    x_0 = sample(base, x_t, times[index:], step, cond, generator, progress, later)
    return SplitSample(x_t=x_t, x_0=x_0, t=float(times[index]))


# ----------------------------------------------------------------------------- flow steps
def euler_step(model, x, t, t_next, cond=None, generator=None):
    """Euler step of the flow ODE dx/ds = v(x, s): x + (t_next - t) v(x, t)."""
    v = model(x, time_vector(t, x), cond)
    return x + (t_next - t) * v


def heun_step(model, x, t, t_next, cond=None, generator=None):
    """Heun (explicit trapezoid) step: two velocity evaluations, second-order accurate."""
    h = t_next - t
    v1 = model(x, time_vector(t, x), cond)
    x_pred = x + h * v1
    v2 = model(x_pred, time_vector(t_next, x), cond)
    return x + 0.5 * h * (v1 + v2)


def midpoint_step(model, x, t, t_next, cond=None, generator=None):
    """Explicit midpoint step: velocity evaluated at the half step."""
    h = t_next - t
    v1 = model(x, time_vector(t, x), cond)
    v2 = model(x + 0.5 * h * v1, time_vector(t + 0.5 * h, x), cond)
    return x + h * v2


def flow_sde_mean_std(model, x, t, t_next, cond, noise_level: float):
    """Mean and std of Flow-GRPO's SDE step x_t -> x_{t_next} for a linear-flow velocity model
    (x_s = (1-s) x_0 + s eps, v = eps - x_0; Liu et al. 2025, ``sde_step_with_logprob``).

    The reverse SDE dx = [v + sigma_s^2/(2s) (x + (1-s) v)] ds + sigma_s dw has the flow's
    marginals for any sigma_s; Flow-GRPO takes sigma_s = a sqrt(s/(1-s)) (a = ``noise_level``) and
    one Euler-Maruyama step of size dt = t_next - t < 0:

        std_t = a sqrt(t / (1 - t')),  t' = t, or t_next where t = 1 (Flow-GRPO's sigma_max),
        mean  = x (1 + std_t^2 dt / (2t)) + v (1 + std_t^2 (1-t) / (2t)) dt,
        std   = std_t sqrt(-dt).

    ``noise_level = 0`` gives the Euler ODE step x + dt v (std 0). Note x + (1-t) v is the model's
    eps estimate, so the drift's correction pulls toward noise as the injected noise pushes away.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    v = model(x, time_vector(t, x), cond)
    dt = t_next - t
    if noise_level == 0:
        return x + dt * v, 0.0
    std_t = noise_level * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
    mean = x * (1 + std_t**2 / (2 * t) * dt) + v * (1 + std_t**2 * (1 - t) / (2 * t)) * dt
    return mean, std_t * math.sqrt(-dt)


def flow_sde_step(noise_level: float = 0.0) -> StepFn:
    """Flow-GRPO's stochastic step of a linear-flow model (:func:`flow_sde_mean_std`): the Euler ODE
    step for ``noise_level = 0``, else mean + std * N(0, I) drawn from the generator."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")

    def step(model, x, t, t_next, cond=None, generator=None):
        mean, std = flow_sde_mean_std(model, x, t, t_next, cond, noise_level)
        return mean + std * randn_like(x, generator) if std > 0 else mean

    return step


def flow_sde_log_prob(noise_level: float):
    """Per-sample Gaussian log-density [B] of a :func:`flow_sde_step` transition, summed over the
    state's entries (computed in float64): sum_i log N(x_next_i; mean_i, std^2). Flow-GRPO averages
    the same terms over the entries; the core's ``log_prob_reduction="mean"`` does that division."""
    if not noise_level > 0:
        raise ValueError(f"policy gradient needs a stochastic sampler (noise level > 0), got {noise_level}")

    def log_prob(model, x, t, t_next, x_next, cond=None):
        mean, std = flow_sde_mean_std(model, x, t, t_next, cond, noise_level)
        d = (x_next.double() - mean.double()).flatten(1)
        return (-0.5 * (d / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(1)

    return log_prob


FLOW_STEPS: dict[str, StepFn] = {"euler": euler_step, "heun": heun_step, "midpoint": midpoint_step}
"""Evaluations of the velocity model per step, used for FLOPs accounting."""
FLOW_STEP_EVALS: dict[str, int] = {"euler": 1, "heun": 2, "midpoint": 2}


# ----------------------------------------------------------------------------- VP (DDIM) step
def ddim_mean_std(model, x, t, t_next, cond, alpha_bar, eta, clip: float | None = None):
    """Mean and std of the DDIM transition x_t -> x_{t_next} (Song et al. 2021, eq. 12).

    x0_hat = (x - sqrt(1-a_t) eps) / sqrt(a_t)
    mean   = sqrt(a_n) x0_hat + sqrt(1 - a_n - sigma^2) eps,
    sigma  = eta sqrt((1 - a_n)/(1 - a_t)) sqrt(1 - a_t/a_n);  eta = 1 is DDPM's posterior.

    ``clip``: clamp x0_hat to [-clip, clip] and recompute eps from it (diffusers' ``clip_sample``),
    exact for data in that range; it keeps small pixel-space models from blowing up at the first
    steps of a schedule whose abar(T) ~ 0 (x0_hat divides the eps error by sqrt(abar)).
    """
    a_t = float(alpha_bar(t))
    a_n = float(alpha_bar(t_next))
    eps = model(x, time_vector(t, x), cond)
    sigma = eta * ((1 - a_n) / (1 - a_t)) ** 0.5 * max(1 - a_t / a_n, 0.0) ** 0.5 if a_t < 1 else 0.0
    direction = max(1 - a_n - sigma**2, 0.0) ** 0.5
    if clip is None:  # mean = (sqrt(a_n)/sqrt(a_t)) x + (direction - sqrt(a_n (1-a_t)/a_t)) eps: two tensor ops
        return torch.add(x * (a_n / a_t) ** 0.5, eps, alpha=direction - (a_n * (1 - a_t) / a_t) ** 0.5), sigma
    x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-clip, clip)
    eps = (x - a_t**0.5 * x0) / max(1 - a_t, 1e-12) ** 0.5
    return a_n**0.5 * x0 + direction * eps, sigma


def _memo(alpha_bar: Callable[[torch.Tensor | float], torch.Tensor]) -> Callable[[float], float]:
    """``alpha_bar`` as a float of a float, remembered per t: a sampler visits the same grid points
    in every chunk and round, and evaluating a schedule is several small tensor ops (the same values,
    so results are unchanged)."""
    @functools.lru_cache(maxsize=4096)
    def value(t: float) -> float:
        return float(alpha_bar(t))

    return value


def _check_ddim(eta: float, clip: float | None) -> None:
    if eta < 0 or (clip is not None and clip <= 0):
        raise ValueError(f"need eta >= 0 and clip > 0 (or None), got eta={eta}, clip={clip}")


def ddim_step(alpha_bar: Callable[[torch.Tensor | float], torch.Tensor], eta: float = 0.0,
              clip: float | None = None) -> StepFn:
    """DDIM step for an eps-prediction model; ``eta=0`` deterministic, ``eta=1`` DDPM-like;
    ``clip`` bounds x0_hat (see :func:`ddim_mean_std`)."""
    _check_ddim(eta, clip)
    alpha_bar = _memo(alpha_bar)

    def step(model, x, t, t_next, cond=None, generator=None):
        mean, sigma = ddim_mean_std(model, x, t, t_next, cond, alpha_bar, eta, clip)
        return mean.add_(randn_like(x, generator), alpha=sigma) if sigma > 0 else mean

    return step


def ddim_log_prob(alpha_bar: Callable[[torch.Tensor | float], torch.Tensor], eta: float,
                  clip: float | None = None):
    """Per-sample log-density of a DDIM transition (for policy gradient); shape [B]. Same ``eta``
    and ``clip`` as the :func:`ddim_step` that drew the samples.

    Deterministic transitions (sigma = 0, e.g. the last step) return zeros: they carry no
    policy-gradient signal.
    """
    _check_ddim(eta, clip)
    if eta == 0:
        raise ValueError(f"policy gradient needs a stochastic sampler (eta > 0), got eta={eta}")

    def log_prob(model, x, t, t_next, x_next, cond=None):
        mean, sigma = ddim_mean_std(model, x, t, t_next, cond, alpha_bar, eta, clip)
        if sigma == 0:
            return torch.zeros(x.shape[0], device=x.device)
        d = (x_next - mean).flatten(1)
        return (-0.5 * (d / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(1)

    return log_prob


# ----------------------------------------------------------------------------- masking step
def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one category per row of ``logits`` [..., K] by the Gumbel-max trick (generator-seeded)."""
    u = rand_like(logits, generator, dtype=torch.float32).clamp_(1e-10, 1 - 1e-7)
    return torch.argmax(logits.float() - torch.log(-torch.log(u)), dim=-1)


def unmask_tokens(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    t: float,
    t_next: float,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step of masking diffusion with linear mask rate.

    A token masked at time t is still masked at t_next with probability t_next / t, so it is
    revealed with probability (t - t_next) / t, its value drawn from softmax(logits). Revealed
    tokens never change again. ``logits``: [..., K] over real tokens (mask excluded);
    ``tokens``: [...] long; ``maskable`` (bool, same shape) restricts which positions may move.
    """
    if not t > t_next >= 0:
        raise ValueError(f"need t > t_next >= 0, got t={t}, t_next={t_next}")
    masked = tokens == mask_id
    if maskable is not None:
        masked = masked & maskable
    p_reveal = 1.0 if t_next == 0 else (t - t_next) / t
    reveal = masked & (rand_like(tokens, generator) < p_reveal)
    draws = sample_categorical(logits, generator)
    return torch.where(reveal, draws, tokens)


def unmask_log_prob(
    tokens: torch.Tensor,
    tokens_next: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    maskable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model-dependent part of log p(tokens_next | tokens) for one :func:`unmask_tokens` step; [B].

    Which positions are revealed does not depend on the model (prob. (t - t_next)/t each), so the
    policy-gradient-relevant log-probability is the sum of log softmax(logits)[value] over the
    positions revealed in this step.
    """
    revealed = (tokens == mask_id) & (tokens_next != mask_id)
    if maskable is not None:
        revealed = revealed & maskable
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, tokens_next.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return (picked * revealed).flatten(1).sum(1)
