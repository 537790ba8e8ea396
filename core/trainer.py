"""The GRAFT / P-GRAFT round loop, shared by every app.

One round (paper Alg. 1 with the P-GRAFT split of Sec. 3):

1. sample ``groups x group_size`` candidates: fine-tuned head over T -> t, frozen base over t -> 0;
2. score the final samples X_0 with the reward, attach the score to X_t;
3. accept by a GRS rule inside each group (+ optional dedup of the accepted keys);
4. append the accepted X_t to the run's store;
5. fine-tune the head for ``train_steps`` steps with the app's loss started at t;
6. log a metrics row and checkpoint.

Sampling is split into fixed chunks, each with its own seed, and chunks are spread over
processes; rewards and samples are gathered so every process makes the same GRS decision on the
global batch. A run with N processes therefore accepts exactly the samples a single process
accepts in the first round (later rounds agree up to floating-point differences in training).
"""

from __future__ import annotations

import contextlib
import enum
import math
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .checkpoint import save_pretrained
from .errors import FieldError, RewardError, UsageError
from .grs import GRSConfig
from .heads import Anchored, apply_lora, build_head, merged_copy  # noqa: F401  (apply_lora, merged_copy: part of the loop's API)
from .integrity import exclusive
from .pretrain import TrainingInterrupted, check_finite, stop_requests
from .progress import make_console, progress_bar, warn
from .rundir import RunDir
from .sampling import SplitSample, StepFn, sample_split
from .schedules import split_times
from .selection import select
from .state import State, batch_size, cat, default_device, index, to_device
from .trackers import current_tracker

RewardFn = Callable[[State, Any], torch.Tensor]
LossFn = Callable[[nn.Module, State, float, Any, "torch.Generator | None"], torch.Tensor]


@dataclass
class GraftProblem:
    """Everything the loop needs from an app: ``prior``, ``times``, ``step``, ``loss``, and either
    ``score`` or ``reward`` (with the optional ``key`` / ``describe`` / ``metrics``).

    - ``prior(n, generator) -> State``: n draws of X_T.
    - ``times``: the sampler grid 1 -> 0; ``step``: the app's step function.
    - ``loss(model, x_start, t_start, cond, generator)``: the denoising loss started at t_start.
    - ``score(x0, cond) -> Scores``: everything the loop learns about a chunk of final samples in
      one call: rewards (finite, [B]), dedup keys, per-sample records kept with accepted samples,
      extra metrics (averaged over chunks weighted by their size). An app that decodes or checks
      its samples once for all four writes this.
    - or, one thing at a time: ``reward(x0, cond) -> Tensor[B]``; ``key(x0) -> list[Hashable]``
      (e.g. canonical SMILES; None = never a duplicate); ``describe(x0, rewards, cond) ->
      DataFrame``; ``metrics(x0, rewards, cond) -> dict``.
    - ``on_round(round, RoundResult)``: called once per round on the main process, after the round
      is committed (and for the final evaluation), with the gathered candidates and the metrics
      row: the place for image grids and other per-round outputs (trl's ``image_samples_hook``).
      The round number is given, never inferred, so it is right under any number of processes.
    - ``conditions``: one entry per prompt/condition (None: unconditional); group g of round r
      uses condition ``(r * groups + g) % len(conditions)``.
    - ``collate(list_of_conditions) -> cond batch`` for the model and reward (default: the list).
    - ``combine(components, groups) -> Tensor[N]``: a round-level reward from the raw component
      scores of the whole round (``Scores.components`` of every chunk, concatenated in global
      order) and the group of each candidate, e.g. a z-score over the round or a rank sum within
      groups; it replaces the chunks' rewards before selection (None: the chunks' rewards stand).
    """

    prior: Callable[[int, torch.Generator], State]
    times: torch.Tensor
    step: StepFn
    loss: LossFn
    reward: RewardFn | None = None
    conditions: list[Any] | None = None
    collate: Callable[[list[Any]], Any] | None = None
    key: Callable[[State], list[Hashable]] | None = None
    describe: Callable[[State, torch.Tensor, Any], pd.DataFrame] | None = None
    metrics: Callable[[State, torch.Tensor, Any], dict[str, float]] | None = None
    score: Callable[[State, Any], "Scores"] | None = None
    on_round: Callable[[int, "RoundResult"], None] | None = None
    combine: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None

    def cond_batch(self, cond_index: torch.Tensor) -> Any:
        if self.conditions is None:
            return None
        items = [self.conditions[i] for i in cond_index.tolist()]
        return self.collate(items) if self.collate is not None else items

    def scores(self, x0: State, cond: Any) -> "Scores":
        """:attr:`score` of a chunk, or the same assembled from ``reward`` / ``key`` / ``describe`` /
        ``metrics``; rewards as float64 on the CPU, shape-checked."""
        n = batch_size(x0)
        if self.score is None and self.reward is None:
            raise ValueError("this GraftProblem has neither score(x0, cond) nor reward(x0, cond)")
        if self.score is not None:
            out = self.score(x0, cond)
            rewards = torch.as_tensor(out.rewards, dtype=torch.float64).cpu()
        else:
            rewards = torch.as_tensor(self.reward(x0, cond), dtype=torch.float64).cpu()
            out = Scores(rewards, self.key(x0) if self.key is not None else None,
                         self.describe(x0, rewards, cond) if self.describe is not None else None,
                         self.metrics(x0, rewards, cond) if self.metrics is not None else None)
        if rewards.shape != (n,):
            raise ValueError(f"reward returned shape {tuple(rewards.shape)}, expected ({n},)")
        return Scores(rewards, out.keys, out.records if out.records is not None else pd.DataFrame(index=range(n)),
                      out.metrics or {}, out.components)


@dataclass
class Scores:
    """What :meth:`GraftProblem.scores` returns for a chunk of B final samples."""

    rewards: torch.Tensor  # [B], finite
    keys: list[Hashable] | None = None  # dedup keys (None: no dedup possible)
    records: pd.DataFrame | None = None  # B rows of app columns kept with accepted samples
    metrics: dict[str, float] | None = None  # chunk means, e.g. {"validity": 0.86}
    components: dict[str, torch.Tensor] | None = None  # raw component scores [B] each, for GraftProblem.combine


@dataclass(frozen=True)
class GraftConfig:
    """Settings of the GRAFT / P-GRAFT round loop (:func:`run_graft`). CLI flags in brackets.

    Sampling (per round):
        rounds (int, 4): rounds of sample -> accept -> fine-tune [--rounds].
        groups (int, 32): groups sampled per round; candidates per round = groups * group_size
            [--groups]. Group g of round r uses condition (r * groups + g) % len(conditions).
        group_size (int, 8): M, candidates per group (Best-of-N's N) [--m / --group-size].
        sample_batch_size (int, 256): candidates per sampling chunk; each chunk has its own seed,
            so results do not depend on the number of processes (but do on this value).
        split (float, 0.0): P-GRAFT's t, the fraction of sampler steps left to the frozen base;
            0 is plain GRAFT [--t / --split].

    Selection:
        grs (GRSConfig): acceptance rule within each group: rs / bon / topk / threshold with
            alpha, k, threshold [--rule --alpha --k --threshold].
        dedup (bool, False): keep one copy per key (``GraftProblem.key``) in the training set
            (core.selection) [--dedup].
        replay (bool, False): train on every accepted sample so far, not only this round's
            [--replay].

    Fine-tuning (per round):
        train_steps (int, 100): optimizer steps [--train-steps]. batch_size (int, 64) [--batch-size].
        lr (float, 1e-4): AdamW learning rate [--lr]; with ``cosine`` decayed to 10% over each
            round's steps (a function of the step index: resuming needs no scheduler state).
        weight_decay (float, 0.0), grad_clip (float, 1.0; 0 = off).
        lora_rank (int, 0): LoRA rank, 0 = fine-tune every weight [--lora]; lora_alpha (0 = the
            rank), lora_targets (module names; empty = every nn.Linear).
        anchor (float, 0.0): weight of ``mean((head - base)**2)`` at every input the app's loss
            feeds the head (:class:`Anchored`): a trust region around the frozen base against the
            drift of self-training on the model's own samples [--anchor].

    Run:
        final_eval (bool, True): after the last round, sample one more round from the fine-tuned
            sampler and log it as the ``eval`` row.
        seed (int, 0): seeds sampling chunks, acceptance and training (see :class:`Stream`) [--seed].

    On ``--resume`` only rounds (upwards), lr, train_steps, grad_clip and weight_decay may change
    (``core.rundir.RESUMABLE``).
    """

    rounds: int = 4
    groups: int = 32
    group_size: int = 8
    grs: GRSConfig = field(default_factory=GRSConfig)
    dedup: bool = False
    split: float = 0.0
    train_steps: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cosine: bool = True
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    sample_batch_size: int = 256
    replay: bool = False
    anchor: float = 0.0
    final_eval: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.grs, dict):
            object.__setattr__(self, "grs", GRSConfig(**self.grs))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("rounds", "groups", "group_size", "batch_size", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("train_steps", "lora_rank"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.split < 1.0:
            raise FieldError("split", f"(P-GRAFT t) must be in [0, 1), got {self.split}")
        if self.grs.rule == "topk" and self.grs.k > self.group_size:
            detail = f"k={self.grs.k} exceeds the group size M={self.group_size} (need K <= M)"
            raise FieldError("k", detail, detail)
        if not self.lr > 0:
            raise FieldError("lr", f"must be > 0, got {self.lr}")
        if not self.anchor >= 0:
            raise FieldError("anchor", f"must be >= 0, got {self.anchor}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraftConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Stream(enum.IntEnum):
    """Named seed streams: the last part of :func:`generator_for`'s key, so no two uses of the run
    seed draw the same numbers. Round-loop sampling chunks use ``(seed, round, chunk)`` without one.
    The values are fixed: changing one changes every run."""

    ACCEPT = 1 << 20  # GRS tie-breaks and RS uniforms of a round
    TRAIN_BATCH = 1 << 21  # which accepted samples form a fine-tuning batch
    TRAIN_LOSS = 1 << 22  # the loss's noise levels and noise, per process
    SAMPLE = 1 << 23  # sample_finetuned's chunks (evaluation and sampling commands)
    PG_EPOCH = 1 << 24  # policy gradient: sample order in an epoch
    PG_STEPS = 1 << 25  # policy gradient: which denoising steps a minibatch trains on
    LORA_INIT = 1 << 29  # the LoRA adapters' initial weights (GRAFT head and PG policy)


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (seed, round, chunk, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def generator_for(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------- sampling a round
@dataclass
class Candidates:
    """A round's candidates, in global order. ``x_t`` is the training state (X_0 for GRAFT)."""

    x_t: State
    x_0: State
    rewards: torch.Tensor
    groups: torch.Tensor
    cond_index: torch.Tensor
    keys: list[Hashable] | None
    records: pd.DataFrame
    extra_metrics: dict[str, float]
    states: list[State] | None = None  # with trajectory=True: [X_T, ..., X_0] on the model's device
    components: dict[str, torch.Tensor] | None = None  # raw component scores of the round (GraftProblem.combine)


@dataclass
class RoundResult:
    """What :attr:`GraftProblem.on_round` receives: the round's gathered candidates (on the CPU,
    in global order) and its metrics row; ``phase`` is ``"train"`` or ``"eval"``."""

    round: int
    phase: str
    candidates: Candidates
    row: dict[str, Any]


def _accelerator(cpu: bool | None = None):
    """Accelerator on the GPU when one is visible, else on the CPU (gloo for multi-process)."""
    from accelerate import Accelerator

    return Accelerator(cpu=default_device().type == "cpu" if cpu is None else cpu)


def sharded_engine(accelerator) -> str | None:
    """``"deepspeed-<stage>"`` or ``"fsdp"`` when ``accelerator`` (from ``accelerate launch
    --config_file configs/accelerate/...``) shards the training state over processes, else None
    (one process, or DDP: every process holds the whole head and its optimizer)."""
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", "")
    if kind == "DEEPSPEED":
        plugin = accelerator.state.deepspeed_plugin
        return f"deepspeed-{getattr(plugin, 'zero_stage', None) or plugin.deepspeed_config.get('zero_optimization', {}).get('stage', 0)}"
    return "fsdp" if kind == "FSDP" else None


def configure_engine(accelerator, cfg: GraftConfig) -> None:
    """Before ``accelerator.prepare``: DeepSpeed needs the per-process micro batch (the round loop
    feeds no dataloader to infer it from) and does the gradient clipping itself; fill both from
    ``cfg`` where its config leaves them to ``auto``."""
    if (sharded_engine(accelerator) or "").startswith("deepspeed"):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // accelerator.num_processes)
        if ds.get("train_batch_size", "auto") == "auto":
            ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accelerator.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = float(cfg.grad_clip) if cfg.grad_clip > 0 else 0.0


@contextlib.contextmanager
def full_weights(accelerator, model: nn.Module) -> Iterator[None]:
    """The block sees every weight of the prepared ``model`` whole in
    ``accelerator.unwrap_model(model)`` (for sampling, or a merged copy): under FSDP its full
    parameters are summoned (read only), under DeepSpeed ZeRO-3 gathered; otherwise nothing to do.
    Every process must enter it (a collective under those engines)."""
    engine = sharded_engine(accelerator)
    if engine == "fsdp" and not getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            yield
    elif engine == "deepspeed-3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(accelerator.unwrap_model(model).parameters()), modifier_rank=None):
            yield
    else:
        yield


def head_weights(accelerator, model: nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """The state dict of the prepared ``model`` for a checkpoint, called on every process: gathered
    whole (``accelerator.get_state_dict``, a collective) under FSDP / ZeRO-3, else the unwrapped
    model's own on the main process ({} on the others, which save nothing)."""
    if sharded_engine(accelerator) in ("fsdp", "deepspeed-3"):
        return accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model).state_dict() if main else {}


def _gather(obj: list[Any], accelerator) -> list[Any]:
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)


def sample_candidates(
    problem: GraftProblem,
    head: nn.Module,
    base: nn.Module,
    cfg: GraftConfig,
    round_: int,
    accelerator=None,
    show_progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    trajectory: bool = False,
) -> Candidates:
    """Sample, score and describe one round's candidates (sharded over processes, then gathered).

    The one chunked, seeded sampling loop: GRAFT / P-GRAFT rounds, the policy-gradient baseline
    (``trajectory=True`` keeps every state of the grid, one process only) and final evaluations.
    ``should_stop()`` is asked after each chunk; when it says so, :class:`RoundStopped` is raised."""
    if trajectory and accelerator is not None and accelerator.num_processes > 1:
        raise ValueError("trajectory=True samples in one process only")
    n = cfg.groups * cfg.group_size
    groups = torch.arange(n) // cfg.group_size
    n_cond = 1 if problem.conditions is None else len(problem.conditions)
    cond_index = (round_ * cfg.groups + groups) % n_cond
    k = split_times(problem.times, cfg.split).index
    rank = 0 if accelerator is None else accelerator.process_index
    world = 1 if accelerator is None else accelerator.num_processes
    chunks = list(range(math.ceil(n / cfg.sample_batch_size)))
    mine = chunks[rank::world]
    steps_per_chunk = len(problem.times) - 1
    payload = []
    with progress_bar(len(mine) * steps_per_chunk, f"round {round_}: sampling", show_progress and rank == 0) as advance:
        for c in mine:
            lo, hi = c * cfg.sample_batch_size, min(n, (c + 1) * cfg.sample_batch_size)
            gen = generator_for(cfg.seed, round_, c)
            cond = problem.cond_batch(cond_index[lo:hi])
            device = next(head.parameters()).device
            x_T = to_device(problem.prior(hi - lo, gen), device)
            states = [x_T] if trajectory else None
            out = sample_split(head, base, x_T, problem.times, k, problem.step, cond, gen, advance,
                               None if states is None else (lambda i, x: states.append(x)))
            out = SplitSample(to_device(out.x_t, "cpu"), to_device(out.x_0, "cpu"), out.t)
            scored = problem.scores(out.x_0, cond)
            rewards, keys, records, extra = scored.rewards, scored.keys, scored.records, scored.metrics
            payload.append((c, out.x_t, out.x_0, rewards, keys, records, extra, hi - lo, states, scored.components))
            if should_stop is not None and should_stop():
                raise RoundStopped("sampling")
    gathered = sorted(_gather(payload, accelerator), key=lambda p: p[0])
    sizes = [p[7] for p in gathered]
    extra: dict[str, float] = {}
    for p in gathered:  # size-weighted mean of per-chunk extra metrics
        for name, value in p[6].items():
            extra[name] = extra.get(name, 0.0) + value * p[7] / n
    components = None
    if gathered and all(p[9] is not None for p in gathered):  # the round's raw component scores, global order
        components = {k: torch.cat([p[9][k] for p in gathered]) for k in gathered[0][9]}
    rewards = torch.cat([p[3] for p in gathered])
    if problem.combine is not None and components is not None:
        rewards = torch.as_tensor(problem.combine(components, groups[: len(rewards)]), dtype=torch.float64).cpu()
    return Candidates(
        x_t=cat([p[1] for p in gathered]),
        x_0=cat([p[2] for p in gathered]),
        rewards=rewards,
        groups=groups[: sum(sizes)],
        cond_index=cond_index,
        keys=None if any(p[4] is None for p in gathered) else [k for p in gathered for k in p[4]],
        records=pd.concat([p[5] for p in gathered], ignore_index=True),
        extra_metrics=extra,
        states=[cat([p[8][i] for p in gathered]) for i in range(len(problem.times))] if trajectory else None,
        components=components,
    )


def round_metrics(c: Candidates, accepted: torch.Tensor | None) -> dict[str, float]:
    """Reward statistics of the candidates (the current model's samples) and of the accepted set."""
    r = c.rewards
    row = {"candidates": len(r), "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
           "reward_max": r.max().item()}
    if c.keys is not None:
        row["unique_frac"] = len({k for k in c.keys if k is not None}) / len(r)
    if accepted is not None:
        row["accepted"] = int(accepted.sum())
        row["accept_rate"] = accepted.float().mean().item()
        row["accepted_reward_mean"] = r[accepted].mean().item() if accepted.any() else float("nan")
    row.update(c.extra_metrics)
    return row


class RoundStopped(Exception):
    """A stop request (SIGTERM / Ctrl-C) reached a chunk or step boundary during ``phase``."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


def stop_check(stop: dict[str, int | None], accelerator) -> Callable[[], bool]:
    """``() -> bool``: has any process been asked to stop? (one tiny all-reduce per call when
    several processes run, so they all stop at the same step)."""
    def check() -> bool:
        flag = stop["signal"] is not None
        if accelerator is None or accelerator.num_processes == 1:
            return flag
        return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)
    return check


# ----------------------------------------------------------------------------- the loop
def run_graft(
    problem: GraftProblem,
    base: nn.Module,
    model_config: dict[str, Any],
    cfg: GraftConfig,
    run_dir: str | Path,
    app_config: dict[str, Any] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    accelerator=None,
    tracker=None,
) -> tuple[nn.Module, pd.DataFrame]:
    """Run ``cfg.rounds`` GRAFT (``cfg.split == 0``) or P-GRAFT rounds; returns (merged head, metrics).

    Writes the run directory described in :mod:`pgraft.core.rundir`, plus ``head/`` (the merged
    fine-tuned model as a save_pretrained directory) at the end. ``base`` is never modified.
    One process writes a run directory at a time (a second is refused with ``RunDirLocked``).
    SIGTERM or Ctrl-C stops the loop at the next sampling chunk or fine-tuning step: the round in
    flight is dropped (resuming regenerates it with the same seeds, so the finished run is the
    same) and :class:`~pgraft.core.pretrain.TrainingInterrupted` says how to resume.
    ``tracker`` (default: :func:`~pgraft.core.trackers.current_tracker`) gets every metrics row
    appended, on the main process (:class:`~pgraft.core.trackers.RoundTracker`).
    """
    check_round_memory(problem, cfg)
    if accelerator is None:
        accelerator = _accelerator()
    run = RunDir(run_dir, resume=resume, report=accelerator.is_main_process)
    lock = exclusive(run.path) if accelerator.is_main_process else contextlib.nullcontext()
    with lock, stop_requests() as stop, early_stops(run, stop, accelerator.is_main_process):
        return _run_graft(problem, base, model_config, cfg, run, app_config, resume, show_progress, accelerator,
                          stop_check(stop, accelerator), tracker=tracker)


@contextlib.contextmanager
def early_stops(run: RunDir, stop: dict[str, int | None], main: bool = True) -> Iterator[None]:
    """What ends a round loop (GRAFT's or the policy gradient's) before its last round, said the same
    way: a reward that failed (:class:`~pgraft.core.errors.RewardError`) gains what is kept and how
    to go on; a stop request (:class:`RoundStopped`) prints that (on the main process) and becomes
    :class:`~pgraft.core.pretrain.TrainingInterrupted` with the signal."""
    try:
        yield
    except RewardError as err:
        done = run.latest_round()
        raise type(err)(f"{err}; stopped in round {done + 1}: {saved_rounds(done)} in {run.path} (rerun the same "
                        "command with --resume once the reward is fixed)") from None
    except RoundStopped as err:
        done = run.latest_round()
        message = (f"stopped by a signal during round {done + 1} ({err.phase}); {saved_rounds(done)} in {run.path}; "
                   "rerun the same command with --resume to continue")
        if main:
            print(message, file=sys.stderr)
        raise TrainingInterrupted(None, run.path, message, signum=stop["signal"]) from None


def restore(checkpoint: tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None, model: nn.Module,
            opt: torch.optim.Optimizer, **knobs: float) -> int:
    """Load a checkpoint of :meth:`~pgraft.core.rundir.RunDir.load_checkpoint` (round, weights,
    trainer state) into ``model`` and ``opt``, with the resumable ``knobs`` (lr, ...) of the run in
    force set on every parameter group; returns the round to go on at (0 without a checkpoint)."""
    if checkpoint is None:
        return 0
    last, weights, state = checkpoint
    model.load_state_dict(weights)
    opt.load_state_dict(state["optimizer"])
    for group in opt.param_groups:
        group.update(knobs)
    return last + 1


def saved_rounds(done: int) -> str:
    """What a stopped run keeps, given its last committed round."""
    return ("round 0 is saved" if done == 0 else f"rounds 0-{done} are saved") if done >= 0 else "no round had finished"


def state_nbytes(x: State) -> int:
    """Bytes of a state (a tensor, or a dict of tensors)."""
    tensors = x.values() if isinstance(x, dict) else [x]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_round_memory(problem: GraftProblem, cfg: GraftConfig) -> None:
    """Refuse, before anything is allocated or written, a round whose candidates' states alone
    (X_t and X_0 of groups × M samples, plus their bookkeeping) exceed this machine's memory: a
    :class:`~pgraft.core.errors.FieldError` naming ``--groups``, instead of an allocator failure
    deep in sampling. Sizes come from one prior draw."""
    import os

    n = cfg.groups * cfg.group_size
    need = n * (2 * state_nbytes(problem.prior(1, torch.Generator().manual_seed(0))) + 24)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf: nothing to compare with
        return
    if need > total:
        raise FieldError("groups", f"{cfg.groups:,} groups x {cfg.group_size} candidates = {n:,} per round, whose "
                                   f"states alone need {need / 2**30:,.1f} GiB, more than this machine's "
                                   f"{total / 2**30:.1f} GiB of memory; lower --groups or --m", flag="--groups")


def _run_graft(problem, base, model_config, cfg, run: RunDir, app_config, resume, show_progress, accelerator,
               should_stop, tracker=None) -> tuple[nn.Module, pd.DataFrame]:
    main = accelerator.is_main_process
    tracker = tracker if tracker is not None else current_tracker()
    t_split = split_times(problem.times, cfg.split).t
    if main and cfg.grs.rule == "rs" and cfg.grs.bound is None:
        warn("--rule rs without a reward bound: the round's best reward is the bound, an approximation that always "
             "keeps the best candidate (biased below accept ∝ exp(r/α)); give --reward-max for exact rejection "
             "sampling")
    checkpoint = None
    if resume and run.latest_round() >= 0 and sharded_engine(accelerator):  # refused before anything is written
        raise UsageError(f"--resume under {sharded_engine(accelerator)}: its checkpoints keep the whole head but one "
                         "process's optimizer shard; resume a run started with one process, torchrun or "
                         "configs/accelerate/ddp.yaml, or start a new --out")
    if resume and run.latest_round() >= 0:
        # before anything is written or truncated: a refusal leaves the run directory as it was.
        # Every process loads the checkpoint (and so the store digests of its rounds) and, with
        # replay, checks the store itself, so all of them refuse together (none waits for the others).
        checkpoint = run.load_checkpoint()
        if main or cfg.replay:
            run.check_store(replay=cfg.replay and checkpoint[0] + 1 < cfg.rounds)
    if main:
        run.save_config({"graft": asdict(cfg), "app": app_config or {}, "model": model_config,
                         "t": t_split, "world_size": accelerator.num_processes}, resume)
    accelerator.wait_for_everyone()

    base = base.eval().requires_grad_(False).to(accelerator.device)
    head = build_head(base, cfg, init_seed=derive_seed(cfg.seed, Stream.LORA_INIT))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # a resumable knob may have changed (cosine rescales lr per step)
    start = restore(checkpoint, head, opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if main:
        if resume:
            run.remove_temp_files()  # of writes killed before their rename
        run.truncate_after(start - 1)
    else:
        run.forget_store_after(start - 1)
    accelerator.wait_for_everyone()
    configure_engine(accelerator, cfg)
    head, opt = accelerator.prepare(head, opt)
    plain_head = accelerator.unwrap_model(head)
    fit = FineTuning(problem, head, opt, base, cfg, t_split, accelerator, show_progress, should_stop)

    for round_ in range(start, cfg.rounds):
        t0 = time.time()
        plain_head.eval()
        with full_weights(accelerator, head):  # ZeRO-3 / FSDP: the sharded weights gathered for sampling
            cands = sample_candidates(problem, plain_head, base, cfg, round_, accelerator, show_progress,
                                      should_stop if accelerator.num_processes == 1 else None)
        if should_stop():
            raise RoundStopped("sampling")
        seen = run.read_records().get("key", pd.Series([], dtype=str)) if cfg.dedup and cfg.replay else ()
        chosen = select(cands.rewards, cands.groups, cfg.grs, generator_for(cfg.seed, round_, Stream.ACCEPT), round_,
                        cands.keys, cands.records, cfg.dedup, seen)
        row = {"round": round_, "phase": "train", **round_metrics(cands, chosen.accepted)}
        if cfg.dedup:
            row["kept_after_dedup"] = int(chosen.keep.sum())
        if main:
            idx = chosen.index
            run.write_store(round_, index(cands.x_t, idx), cands.cond_index[idx], chosen.records)
        accelerator.wait_for_everyone()
        if not main:
            # the main process took the digests of the files it wrote; the others compute them from
            # the files now that they are written (after wait_for_everyone), so each process checks
            # every later read of this round's store (replay, dedup records) against them
            run.record_store(round_)

        # with replay: the rounds whose store was committed (a deleted file is refused), and this one
        rounds = sorted({r for r in run.store_rounds() if r < round_} | {round_}) if cfg.replay else [round_]
        xs, conds = run.read_store_states(rounds)
        train_x, train_c = cat(xs), torch.cat(conds)
        row.update(_train(fit, train_x, train_c, round_))
        row["seconds"] = time.time() - t0
        weights = head_weights(accelerator, head, main)  # every process: a collective under ZeRO-3 / FSDP
        if main:
            # metrics row first, checkpoint last: latest.json is the commit point of the whole round
            # (a row of a round whose checkpoint did not commit is dropped on resume)
            run.append_metrics(row)
            run.save_checkpoint(round_, weights, {"optimizer": opt.state_dict(), "round": round_})
            print_round_row(row)
            if problem.on_round is not None:
                problem.on_round(round_, RoundResult(round_, "train", cands, row))
            if tracker is not None:  # after on_round: the app's grid of the round is written
                tracker.log(row, round_)
        accelerator.wait_for_everyone()

    with full_weights(accelerator, head):
        merged = merged_copy(accelerator.unwrap_model(head)).eval()
    if cfg.final_eval and start <= cfg.rounds:
        cands = sample_candidates(problem, merged, base, cfg, cfg.rounds, accelerator, show_progress,
                                  should_stop if accelerator.num_processes == 1 else None)
        if should_stop():
            raise RoundStopped("final evaluation")
        row = {"round": cfg.rounds, "phase": "eval", **round_metrics(cands, None)}
        if main and cfg.rounds not in set(run.read_metrics().get("round", pd.Series([], dtype=int)).tolist()):
            run.append_metrics(row)
            print_round_row(row)
        if main and problem.on_round is not None:
            problem.on_round(cfg.rounds, RoundResult(cfg.rounds, "eval", cands, row))
        if main and tracker is not None:
            tracker.log(row, cfg.rounds)
    if main:
        save_pretrained(merged, model_config, run.path / "head")
    accelerator.wait_for_everyone()
    return merged, run.read_metrics()


@dataclass
class FineTuning:
    """What the fine-tuning of every round shares: the head being trained (as the accelerator
    prepared it) and its optimizer, the frozen base (for the anchor), the settings, and where to
    ask whether a stop was requested."""

    problem: GraftProblem
    head: nn.Module
    opt: torch.optim.Optimizer
    base: nn.Module
    cfg: GraftConfig
    t_split: float
    accelerator: Any
    show_progress: bool = True
    should_stop: Callable[[], bool] | None = None


def _train(fit: FineTuning, train_x: State, train_c: torch.Tensor, round_: int) -> dict[str, float]:
    """``cfg.train_steps`` optimizer steps on the accepted set; returns the mean ``train_loss`` (the
    app's loss without the anchor term; nan if nothing to train on) and, with ``cfg.anchor`` > 0,
    the mean ``anchor_penalty``."""
    problem, head, opt, base, cfg, t_split = fit.problem, fit.head, fit.opt, fit.base, fit.cfg, fit.t_split
    accelerator, show_progress, should_stop = fit.accelerator, fit.show_progress, fit.should_stop
    n = batch_size(train_x)
    if n == 0 or cfg.train_steps == 0:
        return {"train_loss": float("nan")}
    if cfg.anchor > 0 and base is None:
        raise ValueError("anchor > 0 needs the frozen base")
    rank, world = accelerator.process_index, accelerator.num_processes
    head.train()
    model = Anchored(head, base) if cfg.anchor > 0 else head
    losses, penalties = [], []
    # what a non-finite loss is blamed on before the learning rate: values no training produces
    suspects = (
        ("the frozen base", lambda: base.named_parameters() if base is not None else (),
         "the base's weights file is damaged (or was saved from a diverged pretraining); restore it, or pass "
         "another --base (an empty directory pretrains a new one)"),
        (f"the accepted set of round {round_} (the states fine-tuned on)",
         lambda: [("its states", train_x)] if torch.is_tensor(train_x) else list(train_x.items()),
         "sampling produced them before this round's fine-tuning began; check the base (--base), the sampler "
         "and the reward"),
    )
    with progress_bar(cfg.train_steps, f"round {round_}: fine-tuning on {n}", show_progress and rank == 0) as advance:
        for step in range(cfg.train_steps):
            gen = generator_for(cfg.seed, round_, step, Stream.TRAIN_BATCH)
            idx = torch.randint(n, (cfg.batch_size,), generator=gen)
            mine = idx[rank::world]
            loss_gen = generator_for(cfg.seed, round_, step, rank, Stream.TRAIN_LOSS)
            loss = problem.loss(model, to_device(index(train_x, mine), accelerator.device), t_split,
                                problem.cond_batch(train_c[mine]), loss_gen)
            losses.append(loss.item())
            if cfg.anchor > 0:
                penalty, model.penalty = model.penalty, 0.0
                penalties.append(float(penalty.detach()) if torch.is_tensor(penalty) else float(penalty))
                loss = loss + cfg.anchor * penalty
            check_finite(loss, f"round {round_}, fine-tuning step {step}", suspects)
            if cfg.cosine:
                scale = 0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.train_steps))
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * scale
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_([p for p in head.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            advance(1, loss=losses[-1])
            if should_stop is not None and step + 1 < cfg.train_steps and should_stop():
                raise RoundStopped(f"fine-tuning, after step {step + 1} of {cfg.train_steps}")
    out = {"train_loss": sum(losses) / len(losses)}
    if penalties:
        out["anchor_penalty"] = sum(penalties) / len(penalties)
    return out


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of torchrun / accelerate launches."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def print_round_row(row: dict[str, Any]) -> None:
    """Print a metrics row as ``name=value`` pairs (4 significant digits)."""
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
    make_console().print(" ".join(f"[bold]{k}[/]={v}" for k, v in shown.items()))


def sample_finetuned(
    problem: GraftProblem,
    head: nn.Module,
    base: nn.Module,
    n: int,
    split: float,
    seed: int = 0,
    batch: int = 256,
    cond_index: torch.Tensor | None = None,
    show_progress: bool = True,
) -> tuple[State, State]:
    """Sample ``n`` states with the P-GRAFT composition (head T -> t, base t -> 0); returns (x_t, x_0)."""
    k = split_times(problem.times, split).index
    x_ts, x_0s = [], []
    steps = len(problem.times) - 1
    chunks = math.ceil(n / batch)
    with progress_bar(chunks * steps, "sampling", show_progress) as advance:
        for c in range(chunks):
            lo, hi = c * batch, min(n, (c + 1) * batch)
            gen = generator_for(seed, c, Stream.SAMPLE)
            ci = cond_index[lo:hi] if cond_index is not None else torch.zeros(hi - lo, dtype=torch.long)
            x_T = to_device(problem.prior(hi - lo, gen), next(head.parameters()).device)
            out = sample_split(head, base, x_T, problem.times, k, problem.step, problem.cond_batch(ci), gen, advance)
            x_ts.append(to_device(out.x_t, "cpu"))
            x_0s.append(to_device(out.x_0, "cpu"))
    return cat(x_ts), cat(x_0s)
