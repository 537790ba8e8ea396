"""The base-model training loop every app's ``pretrain`` command uses.

Data arrive as an infinite iterator of ``(x0, cond)`` batches; the loss is any callable
``loss_fn(model, x0, cond, generator) -> scalar`` (e.g. a flow-matching or masking loss bound to
``t_start = 0``). The loop keeps an EMA of the weights (what gets saved: EMA weights sample
markedly better for small diffusion models), checkpoints atomically, resumes, and stops on a
non-finite loss without touching the last good checkpoint. SIGTERM or Ctrl-C (SIGINT) stops it
cleanly: the step in flight finishes, a checkpoint is written at that step, and
:class:`TrainingInterrupted` is raised (a second signal interrupts at once). So ``timeout 600
pgraft ... pretrain`` or a scheduler's kill loses nothing, and the same command resumes.
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_model
from torch import nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_config, save_json
from .errors import CheckpointError, FieldError, RunError, UsageError
from .integrity import exclusive, load_state_dict_file, replace_files, sha256_file, verify_manifest
from .progress import progress_bar
from .state import State, atomic_write, module_device, to_device

STATE_NAME = "train_state.pt"
DONE_NAME = "pretrain_done.json"

LossFn = Callable[[nn.Module, State, Any, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FieldError("steps", f"must be >= 1, got {self.steps}", f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise FieldError("lr", f"must be > 0, got {self.lr}", f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise FieldError("ema", f"must be in [0, 1), got {self.ema}", f"ema must be in [0, 1), got {self.ema}")


class NonFiniteLossError(RunError, RuntimeError):
    """Raised when a training loss is NaN/inf; the last checkpoint on disk is left intact."""


def check_finite(loss: torch.Tensor, where: str,
                 suspects: Iterable[tuple[str, Callable[[], Iterable[tuple[str, Any]]], str]] = ()) -> None:
    """Raise :class:`NonFiniteLossError` when ``loss`` is NaN/inf. The usual cause is a learning rate
    too high, and the message says so, unless what was read is already broken: ``suspects`` are
    ``(what, tensors, advice)`` triples, ``tensors()`` giving ``(name, tensor)`` pairs (looked at
    only once the loss is not finite); the first holding a non-finite value, or one larger than
    1e6 in magnitude (no trained weight or diffusion state is), is named with its ``advice``."""
    if torch.isfinite(loss):
        return
    for what, tensors, advice in suspects:
        for name, t in tensors():
            if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
                continue
            t = t.detach()
            bad = int((~torch.isfinite(t)).sum())
            peak = float(t.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())
            if bad or peak > 1e6:
                found = f"{bad} non-finite value(s)" if bad else f"a value of magnitude {peak:.3g}"
                raise NonFiniteLossError(f"non-finite loss {loss.item()} at {where}; stopping: {what} holds "
                                         f"{found} in {name}, so the fault is in what was read, not the learning "
                                         f"rate: {advice}")
    raise NonFiniteLossError(f"non-finite loss {loss.item()} at {where}; stopping. "
                             "The last good checkpoint is intact: lower the learning rate (--lr) and rerun with --resume.")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a SIGTERM/SIGINT stopped training at a step boundary; what was done is saved.

    ``signum`` is the signal (the CLI exits with 128 + signum, as a shell does for a killed
    process); ``step`` the last step saved (pretraining) or None."""

    def __init__(self, step: int | None, run_dir: Path, message: str | None = None,
                 signum: int | None = None) -> None:
        super().__init__(message or f"stopped by a signal after step {step}; checkpoint saved in {run_dir} "
                                    "(rerun the same command to resume)")
        self.step, self.run_dir, self.signum = step, run_dir, signum


@contextmanager
def stop_requests():
    """A dict whose ``"signal"`` entry is set when SIGTERM or SIGINT arrives inside the block; the
    signal no longer kills the process there (a second one does: the previous handlers run again).
    Outside the main thread, where handlers cannot be installed, the entry simply stays None."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame) -> None:
        flag["signal"] = signum
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


def pretrain(
    model: nn.Module,
    batches: Iterator[tuple[State, Any]],
    loss_fn: LossFn,
    config: PretrainConfig,
    run_dir: str | Path,
    model_config: dict[str, Any],
    resume: bool = True,
    show_progress: bool = True,
) -> nn.Module:
    """Train ``model`` for ``config.steps`` steps; write ``run_dir/`` as a save_pretrained directory.

    Training runs where ``model`` lives (move it to the GPU first to train there); batches, drawn
    on the CPU, follow it. ``run_dir`` ends up holding ``config.json`` + ``model.safetensors`` (EMA weights),
    ``train_state.pt`` (raw weights, optimizer, step; tensors and numbers only, read without
    unpickling by :mod:`~pgraft.core.torch_checkpoint`) for resuming, ``manifest.json`` (checksums, verified on resume),
    ``pretrain_config.json``, ``loss.csv`` and, once every step has run, ``pretrain_done.json``
    (see :func:`is_pretrained`). One process at a time may write ``run_dir`` (a second one is
    refused with :class:`~pgraft.core.errors.RunDirLocked`). Returns the EMA model. ``batches`` must be deterministic given the seed for an
    exactly reproducible resume (the loop skips batches it already consumed).
    """
    run_dir = Path(run_dir)
    if not (resume and (run_dir / STATE_NAME).is_file()):
        found = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (run_dir / n).is_file()]
        if found:  # a base made elsewhere (shipped, copied, a user's own), maybe damaged: never overwrite it
            raise UsageError(f"{run_dir} already holds a model ({', '.join(found)}) but no pretraining state "
                             f"({STATE_NAME}) to resume; refusing to pretrain over it: choose a new or empty "
                             "directory (nothing was changed)")
    with exclusive(run_dir):
        return _pretrain(model, batches, loss_fn, config, run_dir, model_config, resume, show_progress)


def _pretrain(model, batches, loss_fn, config, run_dir: Path, model_config, resume, show_progress) -> nn.Module:
    save_json(asdict(config), run_dir / "pretrain_config.json")
    torch.manual_seed(config.seed)
    device = module_device(model)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config.warmup))
    generator = torch.Generator().manual_seed(config.seed)
    start, log_rows = 0, []
    state_path = run_dir / STATE_NAME
    if resume and state_path.is_file():
        problems = verify_manifest(run_dir, required=False)
        if problems:
            raise CheckpointError(f"cannot resume pretraining in {run_dir}: {problems[0]}; delete {state_path} "
                                  "to start over")
        state = load_state_dict_file(state_path)  # tensors and numbers only; load_state_dict moves them
        model.load_state_dict(state["model"])
        ema_model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start, log_rows = int(state["step"]), list(state["log"])
        for _ in range(start):  # keep the data stream aligned with an uninterrupted run
            next(batches)
    (run_dir / DONE_NAME).unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        payload = {"model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "generator": generator.get_state(), "step": step, "log": log_rows}
        config_text = json.dumps({"_class": type(ema_model).__name__, **model_config}, indent=2, sort_keys=True,
                                 default=str)
        replace_files(run_dir, {WEIGHTS_NAME: lambda tmp: save_model(ema_model, tmp),
                                CONFIG_NAME: lambda tmp: Path(tmp).write_text(config_text),
                                STATE_NAME: lambda tmp: torch.save(payload, tmp)})
        atomic_write(run_dir / "loss.csv", lambda tmp: pd.DataFrame(log_rows).to_csv(tmp, index=False))

    model.train()
    t0, running = time.time(), []
    with stop_requests() as stop, progress_bar(config.steps, "pretrain", show_progress) as advance:
        advance(start)
        for step in range(start, config.steps):
            x0, cond = next(batches)
            x0 = to_device(x0, device)  # a no-op on the CPU
            cond = to_device(cond, device) if isinstance(cond, (torch.Tensor, dict)) else cond
            loss = loss_fn(model, x0, cond, generator)
            check_finite(loss, f"pretrain step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            update_ema(ema_model, model, min(config.ema, (1 + step) / (10 + step)))
            running.append(loss.item())
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps or stop["signal"] is not None:
                log_rows.append({"step": step + 1, "loss": sum(running) / len(running), "seconds": time.time() - t0})
                running = []
            advance(1, loss=loss.item())
            if (step + 1) % config.ckpt_every == 0 or step + 1 == config.steps or stop["signal"] is not None:
                checkpoint(step + 1)
            if stop["signal"] is not None and step + 1 < config.steps:
                err = TrainingInterrupted(step + 1, run_dir, signum=stop["signal"])
                print(err, file=sys.stderr)
                raise err
    if start >= config.steps and not (run_dir / WEIGHTS_NAME).is_file():
        checkpoint(start)
    save_json({"steps": config.steps, "sha256": sha256_file(run_dir / WEIGHTS_NAME)}, run_dir / DONE_NAME)
    return ema_model


def is_pretrained(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a base model that is ready to use: a save_pretrained checkpoint
    whose pretraining finished (``pretrain_done.json``, written as :func:`pretrain`'s last act).
    A directory without pretraining state (a user's own or a shipped model) counts as finished;
    one with ``train_state.pt`` but no marker is an interrupted run (or predates the marker: then
    its recorded step is compared with its ``pretrain_config.json``)."""
    run_dir = Path(run_dir)
    try:
        load_config(run_dir)
    except FileNotFoundError:
        return False
    if not (run_dir / WEIGHTS_NAME).is_file():
        return False
    if (run_dir / DONE_NAME).is_file() or not (run_dir / STATE_NAME).is_file():
        return True
    try:
        steps = json.loads((run_dir / "pretrain_config.json").read_text())["steps"]
        return int(load_state_dict_file(run_dir / STATE_NAME)["step"]) >= steps
    except (OSError, ValueError, KeyError, CheckpointError):
        return False


def trained_steps(run_dir: str | Path) -> int | None:
    """Optimizer steps behind the checkpoint in ``run_dir`` (None when no state records them)."""
    state = Path(run_dir) / STATE_NAME
    return int(load_state_dict_file(state)["step"]) if state.is_file() else None


def infinite_batches(data: State, batch_size: int, seed: int, cond: Any = None) -> Iterator[tuple[State, Any]]:
    """Deterministic infinite shuffled minibatches ``(x0, cond)`` from an in-memory dataset.

    ``cond``, if given, is a tensor/state aligned with ``data`` and indexed alongside it.
    """
    from .state import batch_size as n_of
    from .state import index

    n = n_of(data)
    if n == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = perm[i : i + batch_size]
            yield index(data, idx), (None if cond is None else index(cond, idx))
