"""DiffusionNFT-style likelihood-free fine-tuning (Zheng et al. 2025, "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process"), a 2025 baseline for GRAFT / P-GRAFT on continuous data.

Each round samples ``groups x group_size`` candidates with the current policy (any sampler: no
step log-densities are needed), scores them and turns each reward into an optimality probability

    A = (r - mean_g r) / (std_g r + 1e-8)   (per group, or per round: ``advantage``),
    w = 1/2 + clip(A, -c, c) / (2 c)  in [0, 1]        (c = ``adv_clip``; DiffusionNFT's scheme).

The policy at the round's start, v_old, is frozen; the trained network v_theta defines two implicit
policies, the positive v+ = (1 - beta) v_old + beta v_theta and the negative
v- = (1 + beta) v_old - beta v_theta, and is trained on forward-noised candidates (the app's
:mod:`~pgraft.core.bridges` path from X_0, target u, loss weight lambda) with

    L = E[ lambda (w ||v+ - u||^2 + (1 - w) ||v- - u||^2) ].

For a free output at one x_s, dL/dv = 0 gives v+* = v_old + E[(2w - 1)(u - v_old)]: when v_old is
the regression of the old samples (E[u] = v_old) and w is 1 on some samples and 0 on the others
(in equal numbers), v+* = E[u | w = 1], the flow of the positive samples alone; the negative
policy mirrors it, v-* = 2 v_old - v+*. ``v`` stands for whatever the network predicts (velocity
for a linear flow, eps for a VP model): the loss is the same regression on either.
Derivation: docs/derivations.md, "DiffusionNFT".

v_old is not a second copy of the network: at the start of a round every minibatch's draws (noise
levels and noise) are fixed by its seed, so v_old at them is computed once, before the first update,
and kept (one state-sized tensor per candidate and epoch). A LoRA head (``lora_rank`` > 0) trains
adapters on a frozen base as the policy-gradient baseline's does
(:func:`pgraft.core.heads.build_head`, seeded by the run's LoRA stream).

The run directory is the round loop's (:mod:`pgraft.core.rundir`): locked, a metrics row and a
checkpoint (weights, LoRA included, and optimizer) per round, ``resume=True`` going on at the next
round; SIGTERM / Ctrl-C stops at the next minibatch. One process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn

from .bridges import PathSample
from .checkpoint import save_pretrained
from .errors import UsageError
from .heads import build_head, merged_copy
from .losses import sample_times
from .policy_gradient import ADVANTAGE_GROUPS, _global_rng, final_evaluation, one_process_run, round_advantages
from .pretrain import check_finite
from .progress import progress_bar
from .rundir import RunDir
from .sampling import randn_like
from .state import default_device, to_device
from .trackers import current_tracker
from .trainer import (
    GraftConfig,
    GraftProblem,
    RoundResult,
    RoundStopped,
    Stream,
    derive_seed,
    generator_for,
    print_round_row,
    restore,
    round_metrics,
    sample_candidates,
)

# seed streams of this module (last part of generator_for's key), apart from core.trainer.Stream's
# values and policy_gradient's global-RNG key
_NFT_ORDER = (1 << 31) + 1  # sample order in an epoch
_NFT_PATH = (1 << 31) + 2  # noise levels and noise of a minibatch
_NFT_GLOBAL = (1 << 31) + 3  # torch's global generators during a round (dropout)


Predict = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def call_model(model: nn.Module, x_s: torch.Tensor, s: torch.Tensor, cond: Any) -> torch.Tensor:
    """The default :data:`Predict`: ``model(x_s, s, cond)``."""
    return model(x_s, s, cond)


class ForwardPath(Protocol):
    """A forward process from data (:class:`~pgraft.core.bridges.LinearFlowPath`, ``VPPath``)."""

    def sample(self, x_start: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> PathSample: ...


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT settings.

    ``rounds`` x ``groups`` x ``group_size`` sampled candidates, as GRAFT and the PG baseline;
    ``epochs`` passes over each round's candidates in minibatches of ``batch_size``, AdamW at ``lr``,
    gradient norm clipped to ``grad_clip`` (0: off). ``beta``: the implicit policies' step
    (v+ = (1 - beta) v_old + beta v_theta; 1 makes v+ the trained network itself).
    ``advantage``: reward standardisation groups, as :class:`~pgraft.core.policy_gradient.PGConfig`
    (``"grpo"``: per group of ``group_size``; ``"batch"``: per round); ``adv_clip``: c in
    w = 1/2 + clip(A, -c, c) / (2c). ``lora_*``: LoRA adapters (rank, alpha, target module names; no
    targets: every nn.Linear) instead of full fine-tuning (``lora_rank = 0``: all weights), as
    :class:`~pgraft.core.policy_gradient.PGConfig`. ``sample_batch_size``: sampling chunk;
    ``final_eval``: one last, untrained round with the final model; ``seed``: every draw derives from it.
    No field may change on ``resume``.
    """

    rounds: int = 4
    groups: int = 32
    group_size: int = 8
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-4
    beta: float = 1.0
    advantage: str = "grpo"
    adv_clip: float = 5.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    sample_batch_size: int = 256
    final_eval: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0, got {self.adv_clip}")
        if self.advantage not in ADVANTAGE_GROUPS:
            raise ValueError(f"advantage must be one of {sorted(ADVANTAGE_GROUPS)}, got {self.advantage!r}")
        for name in ("rounds", "groups", "group_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def optimality_weights(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """w = 1/2 + clip(A, -c, c) / (2c) in [0, 1], shape [n]: DiffusionNFT's optimality probability."""
    return 0.5 + advantages.clamp(-adv_clip, adv_clip) / (2 * adv_clip)


def implicit_policies(v_old: torch.Tensor, v: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v+, v-) = ((1 - beta) v_old + beta v, (1 + beta) v_old - beta v); shapes of ``v``."""
    return (1 - beta) * v_old + beta * v, (1 + beta) * v_old - beta * v


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, w: torch.Tensor, beta: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b lambda_b (w_b ||v+_b - u_b||^2 + (1 - w_b) ||v-_b - u_b||^2), norms averaged over entries.

    ``v``, ``v_old``, ``target`` [B, ...]; ``w`` and ``weight`` (lambda, default 1) [B]."""
    pos, neg = implicit_policies(v_old.detach(), v, beta)
    per_pos = ((pos - target) ** 2).flatten(1).mean(1)
    per_neg = ((neg - target) ** 2).flatten(1).mean(1)
    per = w * per_pos + (1 - w) * per_neg
    return (per if weight is None else weight.to(per.dtype) * per).mean()


def minibatch_draw(path: ForwardPath, x0: torch.Tensor, generator: torch.Generator) -> PathSample:
    """A minibatch's forward draw: s ~ U(0, 1) [B], then the noise, both from ``generator``, x_s from ``path``."""
    s = sample_times(x0.shape[0], 0.0, generator, x0.device)
    return path.sample(x0, randn_like(x0, generator), s)


def nft_minibatch_loss(policy: nn.Module, v_old: torch.Tensor, drawn: PathSample, w: torch.Tensor, cond: Any,
                       beta: float, predict: Predict = call_model) -> torch.Tensor:
    """:func:`nft_loss` of ``policy`` at a :func:`minibatch_draw`, v_old being the round's frozen policy there."""
    return nft_loss(predict(policy, drawn.x_t, drawn.t, cond), v_old, drawn.target, w, beta, drawn.weight)


def run_nft(
    problem: GraftProblem,
    path: ForwardPath,
    base: nn.Module,
    model_config: dict[str, Any],
    cfg: NFTConfig,
    run_dir: str | Path,
    app_config: dict[str, Any] | None = None,
    show_progress: bool = True,
    resume: bool = False,
    predict: Predict = call_model,
) -> tuple[nn.Module, pd.DataFrame]:
    """DiffusionNFT fine-tuning of ``base`` (all weights, or LoRA adapters with ``cfg.lora_rank`` > 0);
    returns (policy, LoRA merged in; metrics table).

    ``path`` is the app's forward process from data, the one its base was trained on (a
    :class:`~pgraft.core.bridges.VPPath` for an eps-model, ``LinearFlowPath()`` for a velocity model);
    ``predict(model, x_s, s, cond)`` is the network's output the loss regresses (default
    ``model(x_s, s, cond)``; a guided denoiser passes its unguided call, as its own loss does).
    States must be tensors (continuous data). One process only. The run directory's ``head/`` is the
    merged policy; each round's checkpoint holds the policy's own weights (peft keys with LoRA).
    """
    def tensor_states() -> None:
        if not isinstance(problem.prior(1, torch.Generator().manual_seed(0)), torch.Tensor):
            raise UsageError("DiffusionNFT needs continuous tensor states; this problem's states are dicts")

    with one_process_run(run_dir, resume, "DiffusionNFT", tensor_states) as (run, should_stop):
        return _run_nft(problem, path, base, model_config, cfg, run, app_config, resume, show_progress,
                        should_stop, predict)


def _run_nft(problem, path, base, model_config, cfg: NFTConfig, run: RunDir, app_config, resume, show_progress,
             should_stop: Callable[[], bool], predict: Predict) -> tuple[nn.Module, pd.DataFrame]:
    tracker = current_tracker()  # the one `tracking()` opened around the command, if any
    checkpoint = None
    if resume and run.latest_round() >= 0:
        checkpoint = run.load_checkpoint()  # before anything is written: a refusal changes nothing
    run.save_config({"nft": asdict(cfg), "app": app_config or {}, "model": model_config}, resume)
    device = default_device()
    base = base.eval().requires_grad_(False).to(device)
    policy = build_head(base, cfg, derive_seed(cfg.seed, Stream.LORA_INIT))  # LoRA when cfg.lora_rank > 0
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    start = restore(checkpoint, policy, opt, lr=cfg.lr)
    if resume:
        run.remove_temp_files()
    run.truncate_after(start - 1)
    n = cfg.groups * cfg.group_size
    groups = torch.arange(n) // cfg.group_size
    sample_cfg = GraftConfig(rounds=cfg.rounds, groups=cfg.groups, group_size=cfg.group_size,
                             sample_batch_size=cfg.sample_batch_size, seed=cfg.seed)
    for round_ in range(start, cfg.rounds):
        with _global_rng(derive_seed(cfg.seed, round_, _NFT_GLOBAL), device):
            t0 = time.time()
            policy.eval()
            cands = sample_candidates(problem, policy, policy, sample_cfg, round_, None, show_progress, should_stop)
            if should_stop():
                raise RoundStopped("sampling")
            row = {"round": round_, "phase": "train", **round_metrics(cands, None)}
            w = optimality_weights(round_advantages(cands.rewards, groups, cfg.advantage, cfg.adv_clip), cfg.adv_clip)
            x0 = to_device(cands.x_0, device)
            batches = minibatches(cfg, round_, n)
            v_old = _old_predictions(problem, policy, path, x0, cands.cond_index, batches, cfg, round_, predict,
                                     should_stop, device)
            policy.train()
            losses = []
            updates = len(batches)
            with progress_bar(updates, f"NFT round {round_}: updates", show_progress) as advance:
                for (epoch, b, idx), old in zip(batches, v_old):
                    cond = problem.cond_batch(cands.cond_index[idx])
                    opt.zero_grad(set_to_none=True)
                    drawn = minibatch_draw(path, x0[idx.to(device)], _draw_generator(cfg, round_, epoch, b))
                    loss = nft_minibatch_loss(policy, old, drawn, w[idx].to(device), cond, cfg.beta, predict)
                    check_finite(loss, f"NFT round {round_}, minibatch {b}")
                    loss.backward()
                    if cfg.grad_clip > 0:
                        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    losses.append(loss.item())
                    advance(1, loss=losses[-1])
                    if len(losses) < updates and should_stop():
                        raise RoundStopped(f"NFT update, after minibatch {len(losses)} of {updates}")
            row["train_loss"] = sum(losses) / len(losses)
            row["positive_weight_mean"] = float(w.mean())
            row["seconds"] = time.time() - t0
            run.append_metrics(row)
            run.save_checkpoint(round_, policy.state_dict(), {"optimizer": opt.state_dict(), "round": round_})
            print_round_row(row)
            if problem.on_round is not None:
                problem.on_round(round_, RoundResult(round_, "train", cands, row))
            if tracker is not None:  # after on_round: the app's grid of the round is written
                tracker.log(row, round_)

    merged = merged_copy(policy).eval()
    if cfg.final_eval:
        final_evaluation(problem, merged, merged, sample_cfg, run, show_progress, should_stop, tracker)
    save_pretrained(merged, model_config, run.path / "head")
    return merged, run.read_metrics()


def minibatches(cfg: NFTConfig, round_: int, n: int) -> list[tuple[int, int, torch.Tensor]]:
    """A round's updates in order, as (epoch, minibatch, candidate indices [batch_size]): each epoch a
    seeded permutation of the n candidates cut into ``n // batch_size`` minibatches (at least one)."""
    out = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator_for(cfg.seed, round_, epoch, _NFT_ORDER))
        out += [(epoch, b, perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                for b in range(max(1, n // cfg.batch_size))]
    return out


def _draw_generator(cfg: NFTConfig, round_: int, epoch: int, b: int) -> torch.Generator:
    """The generator of minibatch ``b``'s noise levels and noise: the same whenever it is drawn."""
    return generator_for(cfg.seed, round_, epoch, b, _NFT_PATH)


def _old_predictions(problem: GraftProblem, policy: nn.Module, path: ForwardPath, x0: torch.Tensor,
                     cond_index: torch.Tensor, batches: list[tuple[int, int, torch.Tensor]], cfg: NFTConfig,
                     round_: int, predict: Predict, should_stop: Callable[[], bool],
                     device: torch.device) -> list[torch.Tensor]:
    """v_old at every minibatch's draws, from ``policy`` as it is at the round's start (eval mode, no
    gradients): what a frozen copy of it would predict during the updates, without the copy."""
    policy.eval()
    out = []
    with torch.no_grad():
        for epoch, b, idx in batches:
            drawn = minibatch_draw(path, x0[idx.to(device)], _draw_generator(cfg, round_, epoch, b))
            out.append(predict(policy, drawn.x_t, drawn.t, problem.cond_batch(cond_index[idx])))
            if should_stop():
                raise RoundStopped("the round's old-policy predictions")
    return out
