"""Command-line flags shared by every app's ``train`` command (typer), and their mapping to
:class:`~pgraft.core.trainer.GraftConfig`. Apps declare ``rule: opts.Rule = "topk"`` etc., so the
flags read the same in ``pgraft toy train`` and ``pgraft molecule train``.

The short flags ``--m``, ``--k`` and ``--t`` have long aliases (``--group-size``, ``--top-k``,
``--split``): launchers such as torchrun abbreviate-match ``--m``/``--t`` against their own
options, so multi-process command lines must use the long names."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .grs import RULES, GRSConfig
from .trainer import GraftConfig

Rule = Annotated[str, typer.Option(help=f"GRS acceptance rule: {', '.join(sorted(RULES))}.")]
Alpha = Annotated[float, typer.Option(help="Temperature α of rejection sampling (accept ∝ exp(r/α)).")]
K = Annotated[int, typer.Option("--k", "--top-k", help="K of Top-K: samples kept per group of M.")]
M = Annotated[int, typer.Option("--m", "--group-size", help="M: candidates per group (BoN's N).")]
Groups = Annotated[int, typer.Option(help="Groups sampled per round (candidates per round = groups × M).")]
Threshold = Annotated[float, typer.Option(help="Reward threshold τ for --rule threshold.")]
Dedup = Annotated[bool, typer.Option("--dedup/--no-dedup", help="Keep one copy of each distinct accepted sample.")]
T = Annotated[float, typer.Option("--t", "--split", help="P-GRAFT split: fraction of sampler steps left to the frozen base "
                                             "(0 = plain GRAFT, 0.25 = fine-tune the first 75% of steps).")]
Rounds = Annotated[int, typer.Option(help="GRAFT rounds (sample → accept → fine-tune).")]
TrainSteps = Annotated[int, typer.Option(help="Optimizer steps per round.")]
BatchSize = Annotated[int, typer.Option(help="Fine-tuning batch size.")]
LR = Annotated[float, typer.Option("--lr", help="Fine-tuning learning rate.")]
Lora = Annotated[int, typer.Option("--lora", help="LoRA rank (0 = full fine-tune).")]
Replay = Annotated[bool, typer.Option(help="Train on every accepted sample so far, not just this round's.")]
Seed = Annotated[int, typer.Option(help="Seed for sampling, acceptance and training.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
Out = Annotated[Path, typer.Option("--out", help="Run directory (config, store, metrics, checkpoints).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def graft_config(*, rounds: int, groups: int, m: int, rule: str, alpha: float, k: int, threshold: float,
                 dedup: bool, t: float, train_steps: int, batch_size: int, lr: float, lora: int,
                 replay: bool, seed: int, sample_batch_size: int = 256) -> GraftConfig:
    """Build the core config from the shared flags, turning ValueErrors into usage errors."""
    try:
        return GraftConfig(rounds=rounds, groups=groups, group_size=m,
                           grs=GRSConfig(rule=rule, alpha=alpha, k=k, threshold=threshold), dedup=dedup,
                           split=t, train_steps=train_steps, batch_size=batch_size, lr=lr, lora_rank=lora,
                           replay=replay, seed=seed, sample_batch_size=sample_batch_size)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
