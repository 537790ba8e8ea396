"""ODE inversion, inverse noise correction and FLOPs accounting for flow models (paper Sec. 5).

A pretrained flow's discrete sampler maps noise z to x = Phi(z). Inverting Phi on real data gives
the noises the *sampler* (not the ideal ODE) would need to produce the data; learning errors make
their law differ from N(0, I). A small second flow trained from N(0, I) to that law, followed by
the frozen base, samples closer to the data (CelebA-HQ FID 13.39 -> 8.02 at 1.31x FLOPs).

This module holds the math and the shard files; :mod:`pgraft.core.noise_correction` is the workflow
(directories, locks, resume, refusals) that the apps drive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .sampling import StepFn, euler_step, sample


@dataclass(frozen=True)
class InversionResult:
    """``noise``: inverted X_T, like the input; ``residual``: max over steps of the per-sample
    fixed-point residual ||step(x_i) - x_{i-1}||_inf, shape [B]; ``iterations``: used per step."""

    noise: torch.Tensor
    residual: torch.Tensor
    iterations: list[int]


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (no-op on the CPU): their
    1e-3 relative error would stall the fixed-point iteration of :func:`invert` far above its tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def invert_step(model: nn.Module, x_next: torch.Tensor, t: float, t_next: float, step: StepFn = euler_step,
                cond: Any = None, max_iter: int = 50, tol: float = 1e-5,
                patience: int = 5, x_init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve step(model, x, t, t_next) = x_next for x by fixed-point iteration.

    For Euler, x = x_next - (t_next - t) v(x, t) is backward Euler; the iteration
    x <- x + (x_next - step(x)) is the same map for any deterministic step and contracts when
    |t - t_next| Lip(v) < 1. Each sample iterates until its residual is below ``tol``, or until it
    has not improved for ``patience`` iterations (a few non-contracting pixels would otherwise spend
    all ``max_iter`` model calls); converged samples leave the batch, so later iterations call the
    model on the rest only (``cond`` follows them: :func:`take_samples`). Each sample keeps its best
    iterate.
    ``x_init`` is the first iterate (default ``x_next``, a zeroth-order guess; see :func:`invert`'s
    ``warm_start`` for a first-order one). Each iteration costs one ``step`` call.
    Returns (x, per-sample residual ||step(x) - x_next||_inf, iterations of the slowest sample).
    """
    x = x_next.clone() if x_init is None else x_init.clone()
    best_x = x.clone()
    best_res = torch.full((x.shape[0],), float("inf"), device=x.device)
    # per sample: a sample leaves the batch once its residual is below ``tol`` or has not improved
    # by 1% for ``patience`` iterations, so the model calls follow each sample's own convergence (a
    # batch's slowest image no longer sets every image's cost) and a sample's result does not
    # depend on the batch it is in
    active = torch.arange(x.shape[0], device=x.device)
    stalled = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    it = 0
    for it in range(1, max_iter + 1):
        xa = x[active]
        delta = x_next[active] - step(model, xa, t, t_next, take_samples(cond, active, x.shape[0]), None)
        residual = delta.flatten(1).abs().amax(1)  # residual of the current x
        before = best_res[active]
        better = residual < before
        best_res[active] = torch.where(better, residual, before)
        best_x[active[better]] = xa[better]
        stalled[active] = torch.where(residual < 0.99 * before, 0, stalled[active] + 1)
        x[active] = xa + delta
        active = active[(best_res[active] >= tol) & (stalled[active] < patience)]
        if len(active) == 0:
            break
    return best_x, best_res, it


def take_samples(cond: Any, index: torch.Tensor, batch: int) -> Any:
    """The part of a model condition that belongs to the samples ``index`` of a batch of ``batch``.

    None stays None; a tensor whose first dimension is ``batch`` is indexed, any other tensor is shared
    by all samples and passed whole; an object selects its own samples with ``cond.take_samples(index)``
    (e.g. a batch of prompt embeddings). Anything else cannot be split by sample: TypeError.
    """
    if cond is None:
        return None
    if torch.is_tensor(cond):
        return cond[index.to(cond.device)] if cond.dim() > 0 and cond.shape[0] == batch else cond
    take = getattr(cond, "take_samples", None)
    if take is None:
        raise TypeError(f"a {type(cond).__name__} condition cannot be split by sample: inversion needs a tensor "
                        "(batch first, or shared) or an object with take_samples(index)")
    return take(index)


WARM_STARTS = ("previous", "extrapolate")


@torch.no_grad()
def invert(model: nn.Module, x0: torch.Tensor, times: torch.Tensor, step: StepFn = euler_step, cond: Any = None,
           max_iter: int = 50, tol: float = 1e-5, progress: Callable[[int], None] | None = None,
           patience: int = 5, warm_start: str = "previous") -> InversionResult:
    """Invert the deterministic sampler ``sample(model, ., times, step)`` at ``x0``; walks the grid 0 -> 1.

    ``warm_start`` is each step's first fixed-point iterate:

    - ``"previous"``: the point just inverted (x_next; zeroth order: its error is the whole update
      |t - t_next| |v|);
    - ``"extrapolate"``: that point plus the previous step's update scaled to this step's length,
      x_next + (t - t_next) / (t_prev - t_prev_next) (x_next - y_prev) (first order: the previous
      update is |t - t_next| v at the neighbouring time, so the guess is off by O(dt^2 |dv/ds|)). It
      costs nothing (both points are known) and saves fixed-point iterations; the first step has no
      previous update and starts from x_next. Both converge to the same fixed point: results agree
      within the fixed-point tolerance, not bit for bit.
    """
    if warm_start not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {warm_start!r}")
    x = x0
    worst = torch.zeros(x0.shape[0], device=x0.device)
    iters = []
    pairs = list(zip(times[:-1].tolist(), times[1:].tolist()))
    previous: tuple[torch.Tensor, float] | None = None  # (the previous step's update, its length)
    for t, t_next in reversed(pairs):
        x_init = None
        if warm_start == "extrapolate" and previous is not None:
            update, length = previous
            x_init = x + ((t - t_next) / length) * update
        y = x
        x, res, it = invert_step(model, y, t, t_next, step, cond, max_iter, tol, patience, x_init)
        if warm_start == "extrapolate":
            previous = (x - y, t - t_next)
        worst = torch.maximum(worst, res)
        iters.append(it)
        if progress is not None:
            progress(1)
    return InversionResult(noise=x, residual=worst, iterations=iters[::-1])


@torch.no_grad()
def sample_noise_corrected(
    noise_model: nn.Module,
    base: nn.Module,
    z: torch.Tensor,
    noise_times: torch.Tensor,
    base_times: torch.Tensor,
    noise_step: StepFn = euler_step,
    base_step: StepFn = euler_step,
    cond: Any = None,
) -> torch.Tensor:
    """z ~ N(0, I) -> noise flow (learned law of inverted noises) -> frozen base flow -> sample."""
    x_T = sample(noise_model, z, noise_times, noise_step, cond)
    return sample(base, x_T, base_times, base_step, cond)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` counted by torch.utils.flop_counter (a multiply-add = 2 FLOPs).

    Attention runs on the math backend here: the counter has no formula for the CPU's fused
    attention kernel and would count it as 0 FLOPs (CUDA's fused kernels it does count), so the same
    model would cost less on a CPU than on a GPU.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def sampler_flops(model: nn.Module, example: torch.Tensor, n_steps: int, evals_per_step: int = 1,
                  cond: Any = None) -> int:
    """FLOPs per sample of ``n_steps`` steps of a sampler doing ``evals_per_step`` model calls.

    Counted on a batch of one: one model evaluation is measured, not estimated by hand.
    """
    x = example[:1]
    per_eval = count_flops(lambda: model(x, torch.ones(1, device=x.device), cond))
    return per_eval * evals_per_step * n_steps


def train_noise_flow(noise_model: nn.Module, noises: torch.Tensor, config, run_dir, model_config: dict,
                     batch_size: int = 128, show_progress: bool = True, coupling: str = "independent") -> nn.Module:
    """Fit the noise-correction flow N(0, I) -> law of the inverted noises (flow matching).

    ``config`` is a :class:`pgraft.core.pretrain.PretrainConfig`
    (:meth:`pgraft.core.noise_correction.CorrectionConfig.pretrain_config` builds one); ``coupling="ot"`` trains on
    minibatch-OT pairs (near-straight paths: one or two noise-flow steps suffice, which keeps the
    added FLOPs small). Returns the EMA noise model.
    """
    from .losses import flow_matching_loss
    from .pretrain import infinite_batches, pretrain

    batches = infinite_batches(noises, batch_size, config.seed)
    loss = lambda m, x, c, g: flow_matching_loss(m, x, 0.0, c, g, coupling)  # noqa: E731
    return pretrain(noise_model, batches, loss, config, run_dir, model_config, show_progress=show_progress)


# ----------------------------------------------------------------------------- inverted-noise shards
SHARD_DIR = "shards"  # an inversion directory keeps its noises in DIR/shards/noise_NNNNN.safetensors


def shard_path(directory: str | Path, index: int) -> Path:
    """Shard ``index`` of an inversion directory (the unit of resume)."""
    return Path(directory) / SHARD_DIR / f"noise_{index:05d}.safetensors"


def shard_done(directory: str | Path, index: int, idx: torch.Tensor) -> bool:
    """Whether shard ``index`` is written and inverted exactly the images ``idx`` (its ``index`` tensor)."""
    from safetensors import safe_open

    path = shard_path(directory, index)
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return torch.equal(f.get_tensor("index"), idx)


def read_shards(directory: str | Path, n_shards: int | None = None,
                command: str = "the inversion") -> dict[str, torch.Tensor]:
    """The shards of an inversion concatenated in shard order (all of them, or the first ``n_shards``);
    a :class:`UsageError` naming the folder and ``command`` (what writes the shards) when there are none."""
    from safetensors.torch import load_file

    folder = Path(directory) / SHARD_DIR
    files = sorted(folder.glob("noise_*.safetensors"))[:n_shards]
    if not files:
        raise UsageError(f"no inverted-noise shards in {folder}; run `{command}` first")
    loaded = [load_file(str(f)) for f in files]
    return {k: torch.cat([t[k] for t in loaded]) for k in loaded[0]}

