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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .checkpoint import WEIGHTS_NAME, load_config, save_json, save_pretrained
from .progress import progress_bar
from .state import State, atomic_write, module_device, to_device

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
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN/inf; the last checkpoint on disk is left intact."""


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss {loss.item()} at {where}; stopping. "
                                 "The last good checkpoint is intact: lower the learning rate and --resume.")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a SIGTERM/SIGINT stopped training at a step boundary; the checkpoint is saved."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"stopped by a signal after step {step}; checkpoint saved in {run_dir} "
                         "(rerun the same command to resume)")
        self.step, self.run_dir = step, run_dir


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
    ``train_state.pt`` (raw weights, optimizer, step) for resuming, ``pretrain_config.json`` and
    ``loss.csv``. Returns the EMA model. ``batches`` must be deterministic given the seed for an
    exactly reproducible resume (the loop skips batches it already consumed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(asdict(config), run_dir / "pretrain_config.json")
    torch.manual_seed(config.seed)
    device = module_device(model)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config.warmup))
    generator = torch.Generator().manual_seed(config.seed)
    start, log_rows = 0, []
    state_path = run_dir / "train_state.pt"
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)  # load_state_dict moves it
        model.load_state_dict(state["model"])
        ema_model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start, log_rows = state["step"], state["log"]
        for _ in range(start):  # keep the data stream aligned with an uninterrupted run
            next(batches)

    def checkpoint(step: int) -> None:
        save_pretrained(ema_model, model_config, run_dir)
        payload = {"model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "generator": generator.get_state(), "step": step, "log": log_rows}
        atomic_write(state_path, lambda tmp: torch.save(payload, tmp))
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
                err = TrainingInterrupted(step + 1, run_dir)
                print(err, file=sys.stderr)
                raise err
    return ema_model


def is_pretrained(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished save_pretrained checkpoint."""
    run_dir = Path(run_dir)
    try:
        load_config(run_dir)
    except FileNotFoundError:
        return False
    return (run_dir / WEIGHTS_NAME).is_file()


def infinite_batches(data: State, batch_size: int, seed: int, cond: Any = None) -> Iterator[tuple[State, Any]]:
    """Deterministic infinite shuffled minibatches ``(x0, cond)`` from an in-memory dataset.

    ``cond``, if given, is a tensor/state aligned with ``data`` and indexed alongside it.
    """
    from .state import batch_size as n_of, index

    n = n_of(data)
    if n == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = perm[i : i + batch_size]
            yield index(data, idx), (None if cond is None else index(cond, idx))
