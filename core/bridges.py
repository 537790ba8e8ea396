"""Forward processes ("bridges") of the three model kinds, as small types.

Modelled on flow_matching's ``ProbPath.sample(x_0, x_1, t) -> PathSample``, in this package's clock
(1 = noise, 0 = data) and with the P-GRAFT restart built in: each path has a ``t_start`` in [0, 1)
and ``sample(x_start, noise, s)`` draws the state at times ``s`` [B] (each >= t_start) of the forward
process *started at* ``x_start``, the state at ``t_start``. ``t_start = 0`` (the default) is the
ordinary forward process from data ``x_start = X_0``; ``t_start = t > 0`` is the bridge from an
accepted intermediate X_t that P-GRAFT fine-tunes on. The paths are pure: the randomness is an
argument (standard normal noise, or uniforms for masking), so the losses in
:mod:`pgraft.core.losses` draw it from their generator in a fixed order and pass it in.

Every path returns a :class:`PathSample`: the state at ``s``, ``s`` itself, the regression target
and the loss weight. Derivations: docs/derivations.md, section 3 ("P-GRAFT losses").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _check_t_start(t_start: float) -> float:
    t_start = float(t_start)
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"t_start must be in [0, 1), got {t_start}")
    return t_start


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] tensor viewed as [B, 1, ...] to broadcast against ``x``, in ``x``'s dtype."""
    return v.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass(frozen=True)
class PathSample:
    """One draw of a forward process at per-sample times ``t`` [B].

    - ``x_t``: the state at time ``t`` (the losses call this time ``s``), shaped like the start state.
    - ``t``: the times [B].
    - ``target``: what the model regresses on at (x_t, t): the conditional velocity (linear flow),
      the noise eta (VP: the eps-model is trained on ``||sqrt(weight) eps_theta - target||^2``), or
      the clean tokens (masking: their value at ``t_start``).
    - ``weight``: the loss weight: per sample [B] (float) for the Gaussian paths; for masking, a bool
      tensor like ``x_t`` marking the positions that carry loss (masked at t, visible at t_start).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class LinearFlowPath:
    """The linear (rectified) flow x_s = (1 - s) x_0 + s eps, optionally restarted at ``t_start``.

    From data (t_start = 0): x_s = (1 - s) x_0 + s eps and d x_s / ds = eps - x_0 is the velocity
    target; the weight is 1. Note x_s - s * target = x_0: the target is exactly the velocity whose
    Euler step to s = 0 lands on the data.

    From an accepted X_t = (1 - t) X_0 + t eps' (t = t_start > 0) we continue with fresh noise eta:
    X_s = m_s X_t + sigma_s eta. Keeping the data coefficient of the base path, (1 - s) X_0, forces
    m_s = (1 - s)/(1 - t); keeping its noise variance s^2 forces m_s^2 t^2 + sigma_s^2 = s^2, i.e.

        sigma_s^2 = s^2 - (1 - s)^2 c,   c = t^2 / (1 - t)^2,

    positive for s > t. The target is the path's time derivative at fixed (X_t, eta):

        u = m_s' X_t + sigma_s' eta = -X_t / (1 - t) + (s + (1 - s) c) / sigma_s * eta.

    Its conditional expectation given X_s is the base's marginal velocity (the coefficients of x and
    of the score come out independent of t), so the head keeps the base's parametrisation. As
    sigma_s' ~ 1/sigma_s blows up at s -> t, each time is weighted by w(s) = sigma_s^2 / s^2 in
    [0, 1], which keeps w |u|^2 bounded and leaves the per-time minimiser unchanged. sigma_s^2 is
    clamped at 1e-12, so s = t gives X_s = X_t up to 1e-6 * eta and a weight ~ 1e-12.
    """

    t_start: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_start", _check_t_start(self.t_start))

    def sample(self, x_start: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> PathSample:
        """x_start [B, ...] (X_0, or X_t at ``t_start``), noise like it, s [B] -> PathSample."""
        t = self.t_start
        s_ = _expand(s, x_start)
        if t == 0.0:
            return PathSample((1 - s_) * x_start + s_ * noise, s, noise - x_start, torch.ones_like(s))
        c = t**2 / (1 - t) ** 2
        m = (1 - s_) / (1 - t)
        var = (s_**2 - (1 - s_) ** 2 * c).clamp_min(1e-12)
        sigma = var.sqrt()
        dsigma = (s_ + (1 - s_) * c) / sigma
        x_s = m * x_start + sigma * noise
        u = -x_start / (1 - t) + dsigma * noise
        w = (var / s_**2).view(-1)
        return PathSample(x_s, s, u, w.to(s.dtype))


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


@dataclass(frozen=True)
class VPPath:
    """Variance-preserving diffusion x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s) eps, restartable.

    ``alpha_bar`` maps times (a float64 tensor) to abar. Started at X_t (t = t_start), the forward
    Markov chain continues as

        X_s = sqrt(abar_s / abar_t) X_t + sqrt(1 - abar_s / abar_t) eta,

    whose total noise variance, abar_s (1 - abar_t)/abar_t + 1 - abar_s/abar_t = 1 - abar_s, is the
    base's at every s. Denoising score matching on this step makes the base-parametrised eps-model
    (eps_theta = -sqrt(1 - abar_s) grad log p_s) regress on eta / sqrt(lambda) with

        lambda = (1 - abar_s/abar_t) / (1 - abar_s)  in [0, 1]   (:func:`eps_loss_weight`).

    Weighting time s by lambda gives the bounded loss ||sqrt(lambda) eps_theta(X_s, s) - eta||^2,
    so the sample's ``target`` is eta and its ``weight`` lambda. At t_start = 0 (abar_0 = 1) lambda
    is 1 and this is the ordinary eps loss; at s = t_start > 0 the step is the identity and lambda 0.
    abar_s/abar_t is clamped at 1 against rounding.
    """

    alpha_bar: Callable[[torch.Tensor], torch.Tensor]
    t_start: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_start", _check_t_start(self.t_start))

    def alpha_bar_at(self, s: torch.Tensor, device=None) -> torch.Tensor:
        """abar(s) in float64, shape [B], on ``device``."""
        return self.alpha_bar(s.double()).to(device)

    def sample(self, x_start: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> PathSample:
        """x_start [B, ...] (X_0, or X_t at ``t_start``), noise eta like it, s [B] -> PathSample."""
        a_s = self.alpha_bar_at(s, x_start.device)
        a_t = float(self.alpha_bar(torch.tensor(self.t_start, dtype=torch.float64)))
        ratio = (a_s / a_t).clamp(max=1.0)
        x_s = _expand(ratio.sqrt(), x_start) * x_start + _expand((1 - ratio).sqrt(), x_start) * noise
        return PathSample(x_s, s, noise, eps_loss_weight(ratio, a_s))


@dataclass(frozen=True)
class MaskingPath:
    """Absorbing-state (masking) diffusion with mask rate s, restartable at ``t_start``.

    At time s each maskable token is replaced by ``mask_id`` independently with probability s.
    From X_t (t = t_start: a fraction t already masked), a token that is still visible must be
    masked by s with probability p = (s - t)/(1 - t), so that its overall masking probability is
    t + (1 - t) p = s; a masked token stays masked (the process never unmasks). The ``noise`` of
    this process is one uniform per token: a visible maskable token is masked iff noise < p.

    The model's clean-token prediction at a position masked at s but visible at t has a known
    target, its value in X_t: ``target`` is ``x_start`` and ``weight`` (bool) marks exactly those
    positions. Positions already masked at t carry no loss.
    """

    mask_id: int
    t_start: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_start", _check_t_start(self.t_start))

    def sample(self, x_start: torch.Tensor, noise: torch.Tensor, s: torch.Tensor,
               maskable: torch.Tensor | None = None) -> PathSample:
        """x_start [B, ...] tokens at ``t_start``, noise [B, ...] uniforms in [0, 1), s [B] (>= t_start),
        ``maskable`` bool like x_start (None: every position) -> PathSample."""
        p = ((s - self.t_start) / (1 - self.t_start)).clamp(0.0, 1.0)
        p = p.view(-1, *([1] * (x_start.ndim - 1)))
        newly = (x_start != self.mask_id) & (noise < p)
        if maskable is not None:
            newly = maskable & newly
        x_s = torch.where(newly, torch.full_like(x_start, self.mask_id), x_start)
        return PathSample(x_s, s, x_start, newly)
