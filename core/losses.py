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

The three forward processes are the types of :mod:`pgraft.core.bridges` (:class:`LinearFlowPath`,
:class:`VPPath`, :class:`MaskingPath`, each restartable at ``t_start``); this module draws the times
and the noise from the generator (times first, then noise) and turns their samples into losses.
:func:`flow_bridge` and :func:`remask` are their tuple forms, kept for the apps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bridges import LinearFlowPath, MaskingPath, VPPath, _check_t_start, _expand, eps_loss_weight  # noqa: F401
from .sampling import rand_like, randn_like


def sample_times(batch: int, t_start: float, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """s ~ U(t_start, 1) per sample, shape [batch], float32."""
    gen_device = generator.device if generator is not None else None
    u = torch.rand(batch, generator=generator, device=gen_device)
    return (t_start + (1.0 - t_start) * u).to(device)


def flow_bridge(x_start: torch.Tensor, t_start: float, s: torch.Tensor, noise: torch.Tensor):
    """Forward linear-flow process from time ``t_start`` to ``s``: returns (x_s, target u, weight w).

    Shapes: x_start [B, ...], s [B]; u like x_start; w [B]. The tuple form of
    :meth:`LinearFlowPath.sample <pgraft.core.bridges.LinearFlowPath.sample>`; see its docstring.
    """
    out = LinearFlowPath(t_start).sample(x_start, noise, s)
    return out.x_t, out.target, out.weight


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
    path = LinearFlowPath(t_start).sample(x_start, noise, s)
    v = model(path.x_t, s, cond)
    per_sample = ((v - path.target) ** 2).flatten(1).mean(1)
    return (path.weight * per_sample).mean()


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
    vp = VPPath(alpha_bar, t_start)
    s = sample_times(x_start.shape[0], t_start, generator, x_start.device)
    eta = randn_like(x_start, generator)
    path = vp.sample(x_start, eta, s)
    lam = _expand(path.weight, x_start)
    eps = model(path.x_t, s, cond)
    per_sample = ((lam.sqrt() * eps - path.target) ** 2).flatten(1).mean(1)
    if weighting == "v":
        per_sample = per_sample / vp.alpha_bar_at(s, x_start.device).to(per_sample.dtype)
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
    The tuple form of :meth:`MaskingPath.sample <pgraft.core.bridges.MaskingPath.sample>`.
    """
    path = MaskingPath(mask_id, t_from).sample(tokens, rand_like(tokens, generator), t_to, maskable)
    return path.x_t, path.weight


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions where ``weight_mask`` is true (0 if there are none).

    logits [..., K], targets [...] long, weight_mask [...] bool. Targets at unweighted positions
    may be anything (e.g. the mask id); they are never read.
    """
    if not weight_mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[weight_mask].float(), targets[weight_mask])
