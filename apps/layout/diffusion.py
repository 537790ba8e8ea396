"""Joint diffusion over layouts: a linear flow on boxes and masking diffusion on classes.

State (batch first): ``{"boxes": Float[B, N, 4], "classes": Long[B, N], "mask": Bool[B, N]}``.
``mask`` marks real elements and never changes during sampling (the element count is drawn by
the prior from the training data's count law, or given by the condition). At time s (1 = noise,
0 = data) one clock drives both parts (pgraft conventions, :mod:`pgraft.core.schedules`):

* boxes, in model space z = 2b - 1: z_s = (1 - s) z_0 + s eps, eps ~ N(0, I); the model predicts
  the velocity v = eps - z_0, and sampling is Euler, z <- z + (s_next - s) v;
* classes: each real element's class is replaced by ``mask_id = n_classes`` with probability s
  (mask rate s); sampling reveals a masked class with probability (s - s_next)/s, drawn from the
  model's logits (:func:`pgraft.core.sampling.unmask_tokens`).

Padded slots hold boxes 0 and class -1 at every time and carry no loss.

Class-conditioned generation ("given the element classes, generate the boxes"): ``cond`` is a
Long[B, N] class tensor with -1 at absent slots; the prior copies it into the state, the classes
are never masked and :func:`step` leaves them untouched, so only boxes are generated. One model
serves both tasks: :func:`pretrain_loss` shows it clean classes for a fraction of the samples.

P-GRAFT (docs/derivations.md, "P-GRAFT losses"): :func:`loss` with ``t_start = t > 0`` trains on accepted X_t:
boxes by the linear-flow bridge from X_t (:func:`pgraft.core.losses.flow_bridge`, weight
w(s) = sigma_s^2 / s^2), classes by remasking only the tokens still unmasked at t
(:func:`pgraft.core.losses.remask`); ``t_start = 0`` is ordinary training (GRAFT, pretraining).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from pgraft.core.losses import flow_bridge, masked_cross_entropy, remask, sample_times
from pgraft.core.sampling import rand_like, randn_like, time_vector, unmask_log_prob, unmask_tokens
from pgraft.core.schedules import flow_times

from .data import PAD_CLASS, state_to_page

State = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- prior
def _check_cond(cond: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.dtype != torch.long:
        raise ValueError(f"cond must be a Long[B, N] class tensor (-1 = absent), got "
                         f"{type(cond).__name__} {getattr(cond, 'dtype', '')} {tuple(getattr(cond, 'shape', ()))}")
    if n_classes is not None and ((cond < PAD_CLASS) | (cond >= n_classes)).any():
        bad = cond[(cond < PAD_CLASS) | (cond >= n_classes)][0].item()
        raise ValueError(f"cond holds class {bad}; valid classes are 0..{n_classes - 1} and -1 for absent")
    if not (cond != PAD_CLASS).any(1).all():
        raise ValueError("every layout in cond needs at least one element (a row is all -1)")
    return cond


def prior(n: int, count_probs: Sequence[float], n_classes: int, cond: torch.Tensor | None = None,
          generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> State:
    """Draw n states at time 1: boxes ~ N(0, I) on real slots, classes all masked (or = cond).

    Unconditional: element counts ~ ``count_probs`` (length N + 1, N = max elements), real slots
    first. Conditional: ``cond`` Long[n, N] fixes classes and slots. Shapes: boxes [n, N, 4].
    """
    if cond is not None:
        cond = _check_cond(cond, n_classes)
        if cond.shape[0] != n:
            raise ValueError(f"cond has {cond.shape[0]} rows but n={n} samples were asked for")
        mask = cond != PAD_CLASS
        classes = cond.clone()
    else:
        probs = torch.as_tensor(list(count_probs), dtype=torch.float64)
        if probs.ndim != 1 or len(probs) < 2 or probs[0] != 0 or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"count_probs must be a law over 0..N with P(0) = 0, got {list(count_probs)}")
        max_elements = len(probs) - 1
        counts = torch.multinomial(probs, n, replacement=True, generator=generator)
        mask = torch.arange(max_elements).unsqueeze(0) < counts.unsqueeze(1)
        classes = torch.where(mask, n_classes, PAD_CLASS)
    mask, classes = mask.to(device), classes.to(device)
    boxes = randn_like(torch.empty(*mask.shape, 4, device=device), generator) * mask.unsqueeze(-1)
    return {"boxes": boxes, "classes": classes, "mask": mask}


def model_prior(model: nn.Module, n: int, cond: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> State:
    """:func:`prior` with the count law and class count a :class:`LayoutDenoiser` carries."""
    if cond is None and model.count_probs is None:
        raise ValueError("the model has no count_probs: unconditional sampling needs them (or pass cond)")
    device = next(model.parameters()).device
    return prior(n, model.count_probs or [0.0, 1.0], model.n_classes, cond, generator, device)


def times(n_steps: int) -> torch.Tensor:
    """Sampling grid 1 -> 0 with ``n_steps`` steps (shared by the box flow and the class unmasking)."""
    return flow_times(n_steps)


# ----------------------------------------------------------------------------- sampler step
def step(model: nn.Module, x: State, t: float, t_next: float, cond: torch.Tensor | None = None,
         generator: torch.Generator | None = None) -> State:
    """One joint reverse step t -> t_next (core step signature).

    boxes: Euler, z_next = z + (t_next - t) v_theta(x, t) (padded slots stay 0);
    classes: reveal each masked real class w.p. (t - t_next)/t from softmax(logits); with ``cond``
    the classes are the condition and are left as they are.
    """
    out = model(x, time_vector(t, x), cond)
    mask = x["mask"]
    boxes = (x["boxes"] + (t_next - t) * out["velocity"]) * mask.unsqueeze(-1)
    if cond is None:
        classes = unmask_tokens(x["classes"], out["logits"], model.mask_id, t, t_next, generator, maskable=mask)
    else:
        classes = x["classes"]
    return {"boxes": boxes, "classes": classes, "mask": mask}


# ----------------------------------------------------------------------------- losses
def joint_loss(model: nn.Module, x_start: State, t_start: float, keep_classes: torch.Tensor,
               generator: torch.Generator | None = None, class_weight: float = 1.0) -> torch.Tensor:
    """Box flow matching + class masked cross-entropy from X_{t_start}, with one time s per sample.

    s ~ U(t_start, 1) [B]. Boxes: (z_s, u, w) = flow_bridge(z_{t_start}, t_start, s, eta),
    L_box = mean_b w_b * mean_{real slots, 4 coords} (v_theta - u)^2. Classes of rows with
    ``keep_classes`` [B] are never masked (conditional training); the others are remasked from
    t_start to s and L_class = mean cross-entropy over the newly masked real slots.
    Returns L_box + class_weight * L_class.
    """
    boxes, classes, mask = x_start["boxes"], x_start["classes"], x_start["mask"].bool()
    B = boxes.shape[0]
    s = sample_times(B, t_start, generator, boxes.device)
    noise = randn_like(boxes, generator)
    z_s, u, w = flow_bridge(boxes, t_start, s, noise)
    m = mask.unsqueeze(-1)
    maskable = mask & ~keep_classes.to(mask.device).unsqueeze(1)
    classes_s, newly = remask(classes, maskable, model.mask_id, t_start, s, generator)
    out = model({"boxes": z_s * m, "classes": classes_s, "mask": mask}, s, None)
    sq = ((out["velocity"] - u) ** 2 * m).sum((1, 2)) / (4 * mask.sum(1).clamp_min(1))
    box_loss = (w * sq).mean()
    class_loss = masked_cross_entropy(out["logits"], classes, newly)
    return box_loss + class_weight * class_loss


def loss(model: nn.Module, x_start: State, t_start: float, cond: torch.Tensor | None = None,
         generator: torch.Generator | None = None, class_weight: float = 1.0) -> torch.Tensor:
    """Core loss signature: joint loss from X_{t_start}; with ``cond`` classes are kept (boxes only).

    ``t_start = 0``: ordinary training on clean layouts (GRAFT); ``t_start = t > 0``: P-GRAFT head
    training on accepted X_t (classes masked at t stay masked and carry no loss).
    """
    keep = torch.full((x_start["mask"].shape[0],), cond is not None, dtype=torch.bool)
    return joint_loss(model, x_start, t_start, keep, generator, class_weight)


def pretrain_loss(p_class_cond: float = 0.25, class_weight: float = 1.0
                  ) -> Callable[[nn.Module, State, Any, torch.Generator | None], torch.Tensor]:
    """``loss_fn(model, x0, cond, generator)`` for :func:`pgraft.core.pretrain.pretrain`.

    Each sample keeps its classes clean with probability ``p_class_cond``, so the one model also
    learns "given classes, generate boxes" (at s = 1 it sees clean classes with pure-noise boxes,
    a combination unconditional masking never produces).
    """
    if not 0.0 <= p_class_cond <= 1.0:
        raise ValueError(f"p_class_cond must be in [0, 1], got {p_class_cond}")

    def loss_fn(model: nn.Module, x0: State, cond: Any, generator: torch.Generator | None) -> torch.Tensor:
        keep = rand_like(x0["mask"][:, 0], generator) < p_class_cond
        return joint_loss(model, x0, 0.0, keep, generator, class_weight)

    return loss_fn


# ----------------------------------------------------------------------------- dedup key
def key(x: State, decimals: int = 3) -> list[Hashable]:
    """Dedup key per layout: the sorted tuple of (class, rounded page box) of its real elements.

    Layouts are sets, so element order does not matter; boxes are rounded to ``decimals`` places
    of the page (1e-3 ~ under a pixel of a 1000-pixel page).
    """
    boxes = torch.round(state_to_page(x["boxes"].float()) * 10**decimals).long().cpu()
    classes, mask = x["classes"].cpu(), x["mask"].bool().cpu()
    keys: list[Hashable] = []
    for b, c, m in zip(boxes, classes, mask):
        keys.append(tuple(sorted(zip(c[m].tolist(), map(tuple, b[m].tolist())))))
    return keys


# ----------------------------------------------------------------------------- stochastic step (PG)
def _sde_mean_std(model: nn.Module, x: State, t: float, t_next: float, cond: torch.Tensor | None,
                  noise: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Model output, mean and std of the box transition of :func:`sde_step`."""
    out = model(x, time_vector(t, x), cond)
    z, v = x["boxes"], out["velocity"]
    # the last step (to t = 0) is a plain Euler step: noise there would land directly on the sample
    noise = noise if t_next > 0 else 0.0
    # E[eps | z_t] = z + (1 - t) v on the linear path, so grad log p_t = -(z + (1 - t) v) / t;
    # with g(t)^2 = a^2 t the reverse drift v - g^2/2 * score has no 1/t singularity
    drift = v + 0.5 * noise**2 * (z + (1 - t) * v)
    mean = (z + (t_next - t) * drift) * x["mask"].unsqueeze(-1)
    std = noise * (t * (t - t_next)) ** 0.5
    return out, mean, std


def sde_step(noise: float) -> Callable[..., State]:
    """A stochastic sampler step with the flow's marginals (for the policy-gradient baseline).

    Boxes follow the reverse SDE dz = [v - g(s)^2/2 * grad log p_s(z)] ds + g(s) dW, g(s)^2 = a^2 s,
    whose marginals equal the probability-flow ODE's (Song et al. 2021, eq. 13), discretized by
    Euler-Maruyama: z_next = z + (t_next - t) * (v + a^2/2 (z + (1 - t) v)) + a sqrt(t (t - t_next)) xi.
    ``noise = a = 0`` is exactly :func:`step`. Classes are unmasked as in :func:`step`.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")

    def stochastic_step(model: nn.Module, x: State, t: float, t_next: float, cond: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> State:
        out, mean, std = _sde_mean_std(model, x, t, t_next, cond, noise)
        mask = x["mask"]
        boxes = mean + std * randn_like(mean, generator) * mask.unsqueeze(-1) if std > 0 else mean
        if cond is None:
            classes = unmask_tokens(x["classes"], out["logits"], model.mask_id, t, t_next, generator, maskable=mask)
        else:
            classes = x["classes"]
        return {"boxes": boxes, "classes": classes, "mask": mask}

    return stochastic_step


def sde_log_prob(noise: float) -> Callable[..., torch.Tensor]:
    """log p_theta(x_next | x) of one :func:`sde_step` transition, Float[B] (policy gradient).

    = sum over real slots of the Gaussian box log-density N(z_next; mean_theta, std^2 I)
      + sum over classes revealed in this step of log softmax(logits)[class]
    (:func:`pgraft.core.sampling.unmask_log_prob`; which classes are revealed does not depend on
    theta). With ``noise = 0`` (or on the deterministic last step) the box term is 0 and only the
    class unmasking carries a policy gradient.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")

    def log_prob(model: nn.Module, x: State, t: float, t_next: float, x_next: State,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        out, mean, std = _sde_mean_std(model, x, t, t_next, cond, noise)
        mask = x["mask"].bool()
        lp = torch.zeros(mask.shape[0], device=mask.device)
        if std > 0:
            d = (x_next["boxes"] - mean) / std
            per = -0.5 * d**2 - math.log(std) - 0.5 * math.log(2 * math.pi)
            lp = lp + (per * mask.unsqueeze(-1)).sum((1, 2))
        if cond is None:
            lp = lp + unmask_log_prob(x["classes"], x_next["classes"], out["logits"], model.mask_id, mask)
        return lp

    return log_prob


def project_on_cond(step_fn: Callable[..., State]) -> Callable[..., State]:
    """Wrap a step so that a state drawn for *all* N slots is restricted to ``cond``'s slots and classes.

    The core's ``prior(n, generator)`` does not see the condition; drawing N(0, I) boxes on every
    slot and then zeroing the absent ones gives exactly :func:`prior` with ``cond``, because the box
    noise is i.i.d. per slot. Without ``cond`` the step is unchanged.
    """

    def step_with_cond(model: nn.Module, x: State, t: float, t_next: float, cond: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> State:
        if cond is not None:
            cond = cond.to(x["classes"].device)
            mask = cond != PAD_CLASS
            x = {"boxes": x["boxes"] * mask.unsqueeze(-1), "classes": cond, "mask": mask}
        return step_fn(model, x, t, t_next, cond, generator)

    return step_with_cond
