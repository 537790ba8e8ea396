"""Denoising losses for pretraining, GRAFT (``t_start = 0``) and P-GRAFT (``t_start = t > 0``).

GRAFT fine-tunes on accepted final samples X_0 with the ordinary loss. P-GRAFT fine-tunes the head
on accepted *intermediate* states X_t: the head must sample the tilted law of X_t when run from
T to t, so it is trained only at times s in (t, 1], with the forward process started at X_t.

Because the marginal score/velocity at time s is the same functional of p_s whichever Gaussian
forward process produced p_s, the head keeps the base's parametrization (and sampler); only the
regression target changes. Derivations: docs/derivations.md, "P-GRAFT losses":

Linear flow. Base path x_s = (1-s) x_0 + s eps. Given X_t = (1-t) X_0 + t eps', the forward
process continues as X_s = m_s X_t + sigma_s eta with

    m_s = (1-s)/(1-t),   sigma_s^2 = s^2 - (1-s)^2 t^2/(1-t)^2,

(the total noise variance at s must be s^2). Conditional flow matching on this path regresses on
u = dX_s/ds = m_s' X_t + sigma_s' eta = -X_t/(1-t) + sigma_s' eta with
sigma_s' = (s + (1-s) t^2/(1-t)^2) / sigma_s. Its marginal velocity is
(m'/m) x + (sigma^2 m'/m - sigma sigma') grad log p_s = -x/(1-s) - s/(1-s) grad log p_s, exactly the
base's field, so fine-tuning starts from the base weights. t = 0 gives u = eps - x_0. sigma_s'
diverges as s -> t, so the per-time loss is weighted by w(s) = sigma_s^2/s^2 in [0, 1] (w = 1 at
t = 0): a positive per-time weight leaves the minimiser at each s unchanged and makes the target
variance bounded.

VP diffusion. X_s | X_t = sqrt(a_s/a_t) X_t + sqrt(1 - a_s/a_t) eta (a = abar). Denoising score
matching gives the eps-prediction target sqrt((1-a_s)/(1-a_s/a_t)) eta; weighting by
lambda = (1 - a_s/a_t)/(1 - a_s) turns the loss into || sqrt(lambda) eps_theta(x_s, s) - eta ||^2.
At s = t_start = 0 (a_s = a_t = 1) lambda is 0/0; :func:`eps_loss_weight` uses its limit, 1.

Masking diffusion (mask rate = s). From X_t (a fraction t masked), a token still unmasked at t is
masked by time s with probability (s - t)/(1 - t). The model's clean-token prediction at s for a
position masked at s and unmasked at t is its value in X_t, so cross-entropy is taken on exactly
those positions; tokens already masked at t carry no loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import rand_like, randn_like


def _check_t_start(t_start: float) -> float:
    t_start = float(t_start)
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"t_start must be in [0, 1), got {t_start}")
    return t_start


def sample_times(batch: int, t_start: float, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """s ~ U(t_start, 1) per sample, shape [batch], float32."""
    gen_device = generator.device if generator is not None else None
    u = torch.rand(batch, generator=generator, device=gen_device)
    return (t_start + (1.0 - t_start) * u).to(device)


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def flow_bridge(x_start: torch.Tensor, t_start: float, s: torch.Tensor, noise: torch.Tensor):
    """Forward linear-flow process from time ``t_start`` to ``s``: returns (x_s, target u, weight w).

    Shapes: x_start [B, ...], s [B]; u like x_start; w [B]. See the module docstring.
    """
    t = t_start
    s_ = _expand(s, x_start)
    if t == 0.0:
        return (1 - s_) * x_start + s_ * noise, noise - x_start, torch.ones_like(s)
    c = t**2 / (1 - t) ** 2
    m = (1 - s_) / (1 - t)
    var = (s_**2 - (1 - s_) ** 2 * c).clamp_min(1e-12)
    sigma = var.sqrt()
    dsigma = (s_ + (1 - s_) * c) / sigma
    x_s = m * x_start + sigma * noise
    u = -x_start / (1 - t) + dsigma * noise
    w = (var / s_**2).view(-1)
    return x_s, u, w.to(s.dtype)


def ot_pairing(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Reorder ``noise`` to the minibatch optimal-transport coupling with ``x`` (squared Euclidean
    cost, exact assignment; Tong et al. 2023, Pooladian et al. 2023). Straighter conditional paths
    make the learned flow accurate with very few Euler steps."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.flatten(1).double(), noise.flatten(1).double()).square()
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


def flow_matching_loss(
    model: nn.Module,
    x_start: torch.Tensor,
    t_start: float = 0.0,
    cond: Any = None,
    generator: torch.Generator | None = None,
    coupling: str = "independent",
) -> torch.Tensor:
    """Conditional flow matching on the linear path, started at X_{t_start} (P-GRAFT) or X_0.

    loss = E_s E || sqrt(w(s)) (v_theta(x_s, s) - u) ||^2 averaged over dims, s ~ U(t_start, 1).
    ``coupling="ot"`` pairs data and noise by minibatch OT (:func:`ot_pairing`; unconditional
    and ``t_start = 0`` only, where any coupling with the right marginals is a valid target).
    """
    t_start = _check_t_start(t_start)
    if coupling not in ("independent", "ot"):
        raise ValueError(f"coupling must be 'independent' or 'ot', got {coupling!r}")
    if coupling == "ot" and (t_start > 0 or cond is not None):
        raise ValueError("OT coupling needs t_start = 0 and no condition")
    s = sample_times(x_start.shape[0], t_start, generator, x_start.device)
    noise = randn_like(x_start, generator)
    if coupling == "ot":
        noise = ot_pairing(x_start, noise)
    x_s, u, w = flow_bridge(x_start, t_start, s, noise)
    v = model(x_s, s, cond)
    per_sample = ((v - u) ** 2).flatten(1).mean(1)
    return (w * per_sample).mean()


def eps_loss_weight(ratio: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """lambda = (1 - abar_s/abar_t)/(1 - abar_s) in [0, 1], with ``ratio`` = abar_s/abar_t; shape [B].

    The quotient is 0/0 only where abar_s = 1, i.e. s = t_start = 0 with abar(0) = 1 (torch.rand
    returns exactly 0 about once in 2^24 draws). There abar_t = 1 makes lambda = 1 for every s > 0,
    so its limit s -> 0 is 1 (docs/derivations.md, "VP diffusion (eps and v)"). Every other draw
    takes the plain quotient, bit for bit.
    """
    den = 1 - a_s
    endpoint = den <= 0
    lam = ((1 - ratio) / torch.where(endpoint, torch.ones_like(den), den)).clamp(0.0, 1.0)
    return torch.where(endpoint, torch.ones_like(lam), lam)


def eps_matching_loss(
    model: nn.Module,
    x_start: torch.Tensor,
    t_start: float,
    alpha_bar: Callable[[torch.Tensor], torch.Tensor],
    cond: Any = None,
    generator: torch.Generator | None = None,
    weighting: str = "eps",
) -> torch.Tensor:
    """Weighted eps-prediction loss || sqrt(lambda) eps_theta(x_s, s) - eta ||^2 from X_{t_start}.

    ``weighting="v"`` multiplies each sample's loss by 1/abar(s): for a v-parametrized model
    (eps = sqrt(abar) v + sqrt(1-abar) x_s) this is the v-prediction MSE at t_start = 0, which
    keeps training the model where abar(s) ~ 0 (an eps loss gives those times weight abar(s)).
    A positive per-time weight leaves the minimiser at every s unchanged.
    """
    t_start = _check_t_start(t_start)
    if weighting not in ("eps", "v"):
        raise ValueError(f"weighting must be 'eps' or 'v', got {weighting!r}")
    s = sample_times(x_start.shape[0], t_start, generator, x_start.device)
    a_s = alpha_bar(s.double()).to(x_start.device)
    a_t = float(alpha_bar(torch.tensor(t_start, dtype=torch.float64)))
    ratio = (a_s / a_t).clamp(max=1.0)
    eta = randn_like(x_start, generator)
    x_s = _expand(ratio.sqrt(), x_start) * x_start + _expand((1 - ratio).sqrt(), x_start) * eta
    lam = _expand(eps_loss_weight(ratio, a_s), x_start)
    eps = model(x_s, s, cond)
    per_sample = ((lam.sqrt() * eps - eta) ** 2).flatten(1).mean(1)
    if weighting == "v":
        per_sample = per_sample / a_s.to(per_sample.dtype)
    return per_sample.mean()


def remask(
    tokens: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    t_from: float,
    t_to: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward masking process from time ``t_from`` to per-sample times ``t_to`` [B] (>= t_from).

    Each maskable token not yet masked is masked with probability (t_to - t_from)/(1 - t_from).
    Returns (tokens at t_to, newly_masked bool mask); both shaped like ``tokens`` [B, ...].
    """
    t_from = _check_t_start(t_from)
    p = ((t_to - t_from) / (1 - t_from)).clamp(0.0, 1.0)
    p = p.view(-1, *([1] * (tokens.ndim - 1)))
    newly = maskable & (tokens != mask_id) & (rand_like(tokens, generator) < p)
    return torch.where(newly, torch.full_like(tokens, mask_id), tokens), newly


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions where ``weight_mask`` is true (0 if there are none).

    logits [..., K], targets [...] long, weight_mask [...] bool. Targets at unweighted positions
    may be anything (e.g. the mask id); they are never read.
    """
    if not weight_mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[weight_mask].float(), targets[weight_mask])
