"""DDPO-style policy-gradient baseline (Black et al. 2023), for comparison with GRAFT / P-GRAFT.

The sampler is viewed as a policy over its steps: per-step log-probabilities
log p_theta(x_{k+1} | x_k) of a *stochastic* sampler, a standardised advantage
A = (r - mean_g r) / (std_g r + 1e-8) and the clipped importance ratio objective
-E[min(rho A, clip(rho, 1-eps, 1+eps) A)],  rho = p_theta / p_theta_old, averaged over (a random
``timestep_fraction`` of) the steps. ``PGConfig.advantage`` picks the groups g the reward is
standardised in: ``"grpo"`` (the default), each group of ``group_size`` samples drawn for one
condition (Flow-GRPO's group-relative advantage; for an unconditional app, ``group_size``
consecutive samples); ``"batch"``, the whole round (DDPO's batch normalisation). ``PGConfig.kl``
adds a trust term beta * KL(p_theta || p_base) per step (Flow-GRPO's beta), as the loss
(l - l_ref)^2 / 2 at the sampled steps (l: per-step log-densities, reduced as rho's): its gradient
(l - l_ref) grad l is, on the policy's own samples, exactly the gradient of the reverse KL, and it
stays finite where GRPO's k3 form exp(l_ref - l) - (l_ref - l) - 1 overflows (:func:`kl_penalty`). It uses the same reward interface,
problem description, run directory and sample budget (rounds x groups x group_size) as
:func:`pgraft.core.trainer.run_graft`.

Log-density convention (docs/derivations.md, "Policy-gradient log-density convention"): an
app's ``log_prob`` returns the step's log-density *summed* over the state's entries; the core
divides it by the number of entries D of one sample's state (:func:`state_dims`), so rho is the
per-dimension ratio (p_theta / p_theta_old)^(1/D). That is DDPO's, trl's and Flow-GRPO's
convention (they average the Gaussian log-density over the latent's dimensions), so a clip range
means what it means there. It does not make the clip range independent of D: a step moving the
mean by delta sigma per entry moves log rho of a sample by about delta / sqrt(D) (mean) or
delta sqrt(D) (sum), so eps bounds delta at about eps sqrt(D) (mean) or eps / sqrt(D) (sum).
DDPO's 1e-4 (the default) suits latents of D ~ 10^4; a small state needs a larger eps (the toy,
D = 1, uses 0.2). ``PGConfig(log_prob_reduction="sum")`` keeps the summed log-density. Every
update logs DDPO's diagnostics next to the loss: the fraction of clipped ratios and
approx_kl = E[(log rho)^2] / 2.

The run directory is the round loop's (:mod:`pgraft.core.rundir`): locked, checkpointed per round,
resumable (``resume=True``) and stopped cleanly by SIGTERM / Ctrl-C, see :func:`run_policy_gradient`.
It runs in one process (trajectories are sampled and kept in one process).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .checkpoint import save_pretrained
from .errors import UsageError
from .heads import build_head
from .integrity import exclusive
from .pretrain import check_finite, stop_requests
from .progress import progress_bar
from .rundir import RunDir
from .state import State, default_device, index
from .trackers import current_tracker
from .trainer import (
    GraftConfig,
    GraftProblem,
    RoundResult,
    RoundStopped,
    Stream,
    derive_seed,
    early_stops,
    generator_for,
    merged_copy,
    print_round_row,
    restore,
    round_metrics,
    sample_candidates,
    stop_check,
)

LogProbFn = Callable[[nn.Module, State, float, float, State, Any], torch.Tensor]


# seed stream of torch's global generators during a round (what a model in training mode draws
# from them, e.g. dropout): key (seed, round, _GLOBAL_RNG), apart from core.trainer.Stream's values
_GLOBAL_RNG = 1 << 30


@dataclass(frozen=True)
class PGConfig:
    """Policy-gradient settings.

    ``rounds`` x ``groups`` x ``group_size`` samples, as GRAFT; ``epochs`` passes over each round's
    samples in minibatches of ``batch_size``, AdamW at ``lr``; ``grad_clip`` bounds the gradient
    norm (0: off); ``adv_clip`` bounds the standardised advantages.
    ``clip``: PPO clip range eps of rho. Its default 1e-4 is DDPO's, for ``"mean"`` on latents of
    D ~ 10^4 entries; eps has to be set for the state's size D either way (module docstring).
    ``log_prob_reduction``: ``"mean"`` divides the app's summed log-density by
    :func:`state_dims` of the state; ``"sum"`` uses it as returned.
    ``timestep_fraction``: share of the sampler's steps trained on per minibatch (DDPO).
    ``advantage``: ``"grpo"`` standardises rewards within each group of ``group_size`` (the samples
    of one condition), ``"batch"`` over the whole round (:data:`ADVANTAGE_GROUPS`).
    ``kl``: coefficient beta of :func:`kl_penalty`, KL(policy || base) per step (0: no trust term
    but the clip; > 0 costs one base forward per step and sample per round).
    ``lora_*``: LoRA adapters instead of full fine-tuning (``lora_rank = 0``: all weights).
    ``sample_batch_size``: chunk size when sampling and scoring; ``final_eval``: sample a last,
    untrained round with the final model; ``seed``: every draw derives from it.

    On ``--resume`` only rounds (upwards), lr, epochs and grad_clip may change (:data:`pgraft.core.rundir.RESUMABLE`).
    """

    rounds: int = 4
    groups: int = 32
    group_size: int = 8
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-4
    clip: float = 1e-4
    adv_clip: float = 5.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    sample_batch_size: int = 256
    timestep_fraction: float = 1.0
    final_eval: bool = True
    seed: int = 0
    log_prob_reduction: str = "mean"
    advantage: str = "grpo"
    kl: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.log_prob_reduction not in ("mean", "sum"):
            raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got {self.log_prob_reduction!r}")
        if self.advantage not in ADVANTAGE_GROUPS:
            raise ValueError(f"advantage must be one of {sorted(ADVANTAGE_GROUPS)}, got {self.advantage!r}")
        if not self.kl >= 0:
            raise ValueError(f"kl must be >= 0, got {self.kl}")


def state_dims(x: State) -> int:
    """D, the number of entries of one sample's state: every element of its non-boolean fields.

    Boolean fields (``node_mask``, ``mask``) say which entries exist; they are not drawn by the
    step, so they are not dimensions. D is the padded size, the same for every sample of a problem.
    """
    fields = [x] if isinstance(x, torch.Tensor) else list(x.values())
    dims = sum(v[0].numel() for v in fields if v.dtype != torch.bool)
    if dims == 0:
        raise ValueError(f"state has no non-boolean entries to average over: {[tuple(v.shape) for v in fields]}")
    return dims


def per_dimension(log_prob: LogProbFn) -> LogProbFn:
    """Wrap an app's summed step log-density [B] into the per-dimension one, divided by D of the state."""

    def mean_log_prob(model: nn.Module, x: State, t: float, t_next: float, x_next: State, cond: Any = None):
        return log_prob(model, x, t, t_next, x_next, cond) / state_dims(x_next)

    return mean_log_prob


@dataclass(frozen=True)
class PGStep:
    """``loss``: the clipped surrogate (scalar, differentiable); ``clip_fraction``: share of
    samples with |rho - 1| > eps; ``approx_kl``: E[(log rho)^2] / 2 (DDPO's estimator)."""

    loss: torch.Tensor
    clip_fraction: float
    approx_kl: float


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> PGStep:
    """-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)), rho = exp(log_prob - old_log_prob); inputs [B]."""
    log_ratio = log_prob - old_log_prob.to(log_prob.device)
    ratio = torch.exp(log_ratio)
    a = advantages.to(ratio.device)
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    with torch.no_grad():
        clip_fraction = float(((ratio - 1).abs() > clip).float().mean())
        approx_kl = float(0.5 * (log_ratio.double() ** 2).mean())
    return PGStep(loss, clip_fraction, approx_kl)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, clip: float) -> torch.Tensor:
    """(r - mean_g) / (std_g + 1e-8) within each group, clipped to [-clip, clip].

    A group of equal rewards gets advantage 0 (0 / 1e-8), never NaN: it carries no signal."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for g in groups.unique():
        m = groups == g
        r = rewards[m].double()
        adv[m] = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
    return adv.clamp(-clip, clip).float()


# which samples share the statistics of an advantage: sampling groups [n] -> advantage groups [n]
ADVANTAGE_GROUPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grpo": lambda groups: groups,  # group-relative: the group_size samples of one condition
    "batch": torch.zeros_like,  # the whole round
}


def round_advantages(rewards: torch.Tensor, groups: torch.Tensor, mode: str, clip: float) -> torch.Tensor:
    """A round's advantages [n]: :func:`group_advantages` over the groups ``ADVANTAGE_GROUPS[mode]``."""
    return group_advantages(rewards, ADVANTAGE_GROUPS[mode](groups), clip)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Mean of (log_prob - ref_log_prob)^2 / 2 over samples drawn from the policy (inputs [B]).

    Schulman's k2 estimate of KL(policy || ref): for Gaussian steps of equal sigma its expectation is
    KL + KL^2 / 2, and its gradient with the samples held fixed, E[(l - l_ref) grad l], is exactly
    grad KL (E[grad l] = 0 under the policy). Used as the loss it never overflows, unlike k3."""
    return (0.5 * (log_prob - ref_log_prob.to(log_prob.device)) ** 2).mean()


def run_policy_gradient(
    problem: GraftProblem,
    log_prob: LogProbFn,
    base: nn.Module,
    model_config: dict[str, Any],
    cfg: PGConfig,
    run_dir: str | Path,
    app_config: dict[str, Any] | None = None,
    show_progress: bool = True,
    resume: bool = False,
    tracker=None,
) -> tuple[nn.Module, pd.DataFrame]:
    """Clipped policy-gradient fine-tuning over all sampler steps; returns (merged model, metrics).

    The run directory has the round loop's guarantees (:func:`~pgraft.core.trainer.run_graft`):
    one writer at a time (a second is refused with ``RunDirLocked``); a metrics row then a
    checkpoint per round (policy weights, LoRA included, and optimizer state), the checkpoint's
    ``latest.json`` committing the round; ``resume=True`` rebuilds the policy as a fresh run does,
    loads the newest intact checkpoint and goes on at the next round, so a run killed at any moment
    (SIGKILL included) and resumed ends with the rows and head of an uninterrupted one (on the CPU,
    bit for bit: every draw comes from generators derived from the seed, the round and the batch).
    On resume only the ``pg.*`` fields of :data:`pgraft.core.rundir.RESUMABLE` may change (``rounds`` only upwards). SIGTERM or Ctrl-C
    stops the run at the next sampling chunk or update minibatch: the round in flight is dropped
    and :class:`~pgraft.core.pretrain.TrainingInterrupted` says how to resume. The final
    evaluation row is written once; ``head/`` (the merged policy) is saved at the end.

    One process only: trajectories are sampled and kept in one process (``trajectory=True``), so a
    launch with several processes (``accelerate launch`` / ``torchrun``) is refused. ``tracker``
    (default: :func:`~pgraft.core.trackers.current_tracker`) gets every metrics row appended.
    """
    with one_process_run(run_dir, resume, "the policy-gradient baseline") as (run, should_stop):
        return _run_policy_gradient(problem, log_prob, base, model_config, cfg, run, app_config, resume,
                                    show_progress, should_stop, tracker=tracker)


@contextlib.contextmanager
def one_process_run(run_dir: str | Path, resume: bool, what: str, check: Callable[[], None] | None = None):
    """The run directory of a loop that keeps its trajectories in one process (policy gradient,
    DiffusionNFT), with the round loop's guarantees: a launch with several processes is refused, then
    ``check()`` (the loop's own refusals, before anything is written), then the directory is opened
    (:class:`~pgraft.core.rundir.RunDir`'s refusals) and held by one writer while SIGTERM / Ctrl-C
    requests a clean stop. Yields (run, should_stop)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"{what} runs in one process; start it without accelerate launch / torchrun")
    if check is not None:
        check()
    run = RunDir(run_dir, resume=resume)
    with exclusive(run.path), stop_requests() as stop, early_stops(run, stop):
        yield run, stop_check(stop, None)


@contextlib.contextmanager
def _global_rng(seed: int, device: torch.device):
    """Run the block with torch's global generators (CPU, and the GPU's) seeded, restored afterwards:
    what a model draws from them in training mode (dropout) then depends on (seed, round) only, so a
    resumed run draws what an uninterrupted one does."""
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _run_policy_gradient(problem, log_prob, base, model_config, cfg: PGConfig, run: RunDir, app_config, resume,
                         show_progress, should_stop, tracker=None) -> tuple[nn.Module, pd.DataFrame]:
    tracker = tracker if tracker is not None else current_tracker()
    checkpoint = None
    if resume and run.latest_round() >= 0:
        checkpoint = run.load_checkpoint()  # before anything is written: a refusal changes nothing
    run.save_config({"pg": asdict(cfg), "app": app_config or {}, "model": model_config}, resume)
    if cfg.log_prob_reduction == "mean":
        log_prob = per_dimension(log_prob)
    # on the GPU when one is visible, as run_graft; rewards, keys and metrics see CPU samples
    device = default_device()
    base = base.eval().requires_grad_(False).to(device)
    policy = build_head(base, cfg, derive_seed(cfg.seed, Stream.LORA_INIT))  # LoRA when cfg.lora_rank > 0
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    start = restore(checkpoint, policy, opt, lr=cfg.lr)  # a resumable knob may have changed
    if resume:
        run.remove_temp_files()  # of writes killed before their rename
    run.truncate_after(start - 1)
    times = problem.times
    n = cfg.groups * cfg.group_size
    groups = torch.arange(n) // cfg.group_size
    # the round loop's sampler (same chunks and seeds), keeping every state of the policy's grid
    sample_cfg = GraftConfig(rounds=cfg.rounds, groups=cfg.groups, group_size=cfg.group_size,
                             sample_batch_size=cfg.sample_batch_size, seed=cfg.seed)

    for round_ in range(start, cfg.rounds):
        with _global_rng(derive_seed(cfg.seed, round_, _GLOBAL_RNG), device):
            t0 = time.time()
            policy.eval()
            cands = sample_candidates(problem, policy, policy, sample_cfg, round_, None, show_progress, should_stop,
                                      trajectory=True)
            if should_stop():
                raise RoundStopped("sampling")
            states, rewards, cond_index = cands.states, cands.rewards, cands.cond_index
            steps = len(times) - 1
            row = {"round": round_, "phase": "train", **round_metrics(cands, None)}
            adv = round_advantages(rewards, groups, cfg.advantage, cfg.adv_clip)
            chunks, ref_chunks = [], []
            with torch.no_grad():
                for lo in range(0, n, cfg.sample_batch_size):
                    part = slice(lo, min(n, lo + cfg.sample_batch_size))
                    cond = problem.cond_batch(cond_index[part])
                    for model, out in [(policy, chunks)] + ([(base, ref_chunks)] if cfg.kl > 0 else []):
                        out.append(torch.stack([log_prob(model, index(states[k], part), float(times[k]),
                                                         float(times[k + 1]), index(states[k + 1], part), cond)
                                                for k in range(steps)]))
                    if should_stop():
                        raise RoundStopped("log-probabilities of the sampled steps")
            old = torch.cat(chunks, dim=1)  # [steps, n]
            ref = torch.cat(ref_chunks, dim=1) if cfg.kl > 0 else None  # the base's, for the KL term
            policy.train()
            losses, clip_fractions, approx_kls, kls = [], [], [], []
            n_batches = max(1, n // cfg.batch_size)
            updates = cfg.epochs * n_batches
            with progress_bar(updates, f"PG round {round_}: updates", show_progress) as advance:
                for epoch in range(cfg.epochs):
                    perm = torch.randperm(n, generator=generator_for(cfg.seed, round_, epoch, Stream.PG_EPOCH))
                    for b in range(n_batches):
                        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                        cond = problem.cond_batch(cond_index[idx])
                        opt.zero_grad(set_to_none=True)
                        total = 0.0
                        # DDPO's timestep_fraction: train on a random subset of the sampler's steps
                        n_train = max(1, round(cfg.timestep_fraction * steps))
                        chosen = torch.randperm(steps, generator=generator_for(cfg.seed, round_, epoch, b,
                                                                               Stream.PG_STEPS))
                        for k in sorted(chosen[:n_train].tolist()):
                            lp = log_prob(policy, index(states[k], idx), float(times[k]), float(times[k + 1]),
                                          index(states[k + 1], idx), cond)
                            pg = clipped_surrogate(lp, old[k, idx], adv[idx], cfg.clip)
                            if "first_ratio_error" not in row:  # no update yet: rho = 1 up to the precision's numerics
                                row["first_ratio_error"] = float((lp.detach().double()
                                                                  - old[k, idx].to(lp.device).double()).exp().sub(1)
                                                                 .abs().max())
                            clip_fractions.append(pg.clip_fraction)
                            approx_kls.append(pg.approx_kl)
                            loss = pg.loss
                            if ref is not None:
                                kl = kl_penalty(lp, ref[k, idx])
                                kls.append(kl.item())
                                loss = loss + cfg.kl * kl
                            loss = loss / n_train
                            check_finite(loss, f"PG round {round_}, step {k}")
                            if loss.requires_grad:
                                loss.backward()
                            total += loss.item()
                        if cfg.grad_clip > 0:
                            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        opt.step()
                        losses.append(total)
                        advance(1, loss=total)
                        if len(losses) < updates and should_stop():
                            raise RoundStopped(f"policy update, after minibatch {len(losses)} of {updates}")
            row["train_loss"] = sum(losses) / len(losses)
            row["clip_fraction"] = sum(clip_fractions) / len(clip_fractions)
            row["approx_kl"] = sum(approx_kls) / len(approx_kls)
            if kls:
                row["kl_to_base"] = sum(kls) / len(kls)
            row["seconds"] = time.time() - t0
            # metrics row first, checkpoint last: latest.json is the commit point of the whole round
            # (a row of a round whose checkpoint did not commit is dropped on resume)
            run.append_metrics(row)
            run.save_checkpoint(round_, policy.state_dict(), {"optimizer": opt.state_dict(), "round": round_})
            print_round_row(row)
            if problem.on_round is not None:
                problem.on_round(round_, RoundResult(round_, "train", cands, row))
            if tracker is not None:  # after on_round: the app's grid of the round is written
                tracker.log(row, round_)

    merged = merged_copy(policy).eval()
    if cfg.final_eval:
        final_evaluation(problem, merged, base, sample_cfg, run, show_progress, should_stop, tracker)
    save_pretrained(merged, model_config, run.path / "head")
    return merged, run.read_metrics()


def final_evaluation(problem: GraftProblem, model: nn.Module, base: nn.Module, sample_cfg: GraftConfig, run: RunDir,
                     show_progress: bool, should_stop: Callable[[], bool], tracker=None) -> dict[str, Any]:
    """The evaluation row after the last round (round ``sample_cfg.rounds``, phase ``eval``) of a
    likelihood-based loop (policy gradient, DiffusionNFT): a fresh round of candidates from ``model``
    (``base`` finishing a split sampler), written to metrics.csv once (a resumed finished run does not
    write it again), then the app's ``on_round`` and the tracker. A stop request ends it with
    :class:`~pgraft.core.trainer.RoundStopped`."""
    rounds = sample_cfg.rounds
    try:
        cands = sample_candidates(problem, model, base, sample_cfg, rounds, None, show_progress, should_stop)
    except RoundStopped:
        raise RoundStopped("final evaluation") from None
    if should_stop():
        raise RoundStopped("final evaluation")
    row = {"round": rounds, "phase": "eval", **round_metrics(cands, None)}
    if rounds not in set(run.read_metrics().get("round", pd.Series([], dtype=int)).tolist()):
        run.append_metrics(row)
        print_round_row(row)
    if problem.on_round is not None:
        problem.on_round(rounds, RoundResult(rounds, "eval", cands, row))
    if tracker is not None:
        tracker.log(row, rounds)
    return row
