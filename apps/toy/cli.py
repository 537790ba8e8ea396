"""``pgraft toy ...``: the closed-form Gaussian-mixture world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

from pgraft.core import cli as opts
from pgraft.core.checkpoint import load_pretrained, load_run_head
from pgraft.core.targets import shipped_outputs
from pgraft.core.trainer import GraftConfig, is_main_process, sample_finetuned

from .data import MIXTURES
from .model import ToyDenoiser
from .rewards import REWARD_MAX
from .train import DEFAULT_BASE, ToyConfig, make_problem, pretrain_toy, train_toy

app = typer.Typer(help="Closed-form toy: Gaussian mixtures, exact GRS targets.", no_args_is_help=True)

Mixture = Annotated[str, typer.Option(help=f"Mixture: {', '.join(MIXTURES)}.")]
Base = Annotated[str, typer.Option(help="'shipped' (the base shipped with pgraft: mixture 1d) or a base "
                                        "directory (pretrained first if it holds none).")]



@app.command("pretrain")
def pretrain_cmd(out: opts.Out = Path("runs/toy/base"), mixture: Mixture = "1d",
                 steps: Annotated[int, typer.Option(help="Training steps.")] = 3000,
                 seed: opts.Seed = 0, quiet: opts.Quiet = False) -> None:
    """Train the tiny base diffusion model on the mixture."""
    pretrain_toy(ToyConfig(mixture=mixture, pretrain_steps=steps, seed=seed), out, show_progress=not quiet)
    typer.echo(f"base model saved to {out}")


@app.command("train")
@opts.config_file
@opts.trackers
@opts.graft_options(rule="rs", k=1, groups=256, rounds=1, train_steps=500, batch_size=256, lr=1e-3,
                    sample_batch_size=512, reward_max=REWARD_MAX)
def train_cmd(
    graft: GraftConfig,
    out: opts.Out = Path("runs/toy/graft"),
    base: Base = DEFAULT_BASE,
    mixture: Mixture = "1d",
    reward: Annotated[str, typer.Option(help="Reward: x (linear) or ring.")] = "x",
    resume: opts.Resume = False,
    quiet: opts.Quiet = False,
) -> None:
    """GRAFT (--t 0) or P-GRAFT (--t > 0) rounds on the toy with any GRS rule."""
    from . import train

    toy = ToyConfig(mixture=mixture, reward=reward)
    opts.app_base(train.APP, base, toy)  # a bad --base is refused before anything else
    train_toy(toy, graft, out, base, resume=resume, show_progress=not quiet)
    if is_main_process():
        typer.echo(f"metrics: {out / 'metrics.csv'}  fine-tuned model: {out / 'head'}")


RunOrBase = Annotated[Optional[Path], typer.Argument(
    help="A `pgraft toy train` run directory, or a base model directory (sampled alone).", show_default=False)]
BaseOnly = opts.base_only("toy")


@app.command("sample")
def sample_cmd(run_dir: RunOrBase = None, base: BaseOnly = None,
               n: Annotated[int, typer.Option("-n", help="Number of samples.", callback=opts.at_least(1))] = 1000,
               out: Annotated[Path, typer.Option(help="CSV path (default RUN_DIR/samples.csv; for the shipped base "
                                                      f"{shipped_outputs('toy')}/samples.csv).", callback=opts.output_file)] = None,
               seed: opts.Seed = 1, quiet: opts.Quiet = False) -> None:
    """Sample the fine-tuned model (head T→t, frozen base t→0), or a base alone (40 DDPM-like
    steps, as `train` samples it); writes a CSV with one column per dimension."""
    import json

    from . import train

    target = train.APP.sample_target(run_dir, base)
    if target.is_run:
        config = json.loads((target.directory / "config.json").read_text())
        toy = ToyConfig(**config["app"]["toy"])
        cfg = GraftConfig.from_dict(config["graft"])
        head = load_run_head(ToyDenoiser, target.directory).eval()
        base_model = load_pretrained(ToyDenoiser, train.APP.run_base(config["app"])).eval()
        _, x0 = sample_finetuned(make_problem(toy), head, base_model, n, cfg.split, seed, show_progress=not quiet)
    else:
        base_model = load_pretrained(ToyDenoiser, target.directory).eval()
        _, x0 = sample_finetuned(train.base_problem(target.directory), base_model, base_model, n, 0.0, seed,
                                 show_progress=not quiet)
    path = out or target.output("samples.csv")
    pd.DataFrame(x0.numpy(), columns=[f"x{i}" for i in range(x0.shape[1])]).to_csv(path, index=False)
    typer.echo(f"{n} samples written to {path}; mean {x0.mean(0).tolist()}")


@app.command("diagnose", help=opts.DIAGNOSE_HELP)
@opts.diagnose_options(rule="rs", k=1, groups=256, reward_max=REWARD_MAX)
def diagnose_cmd(
    graft: GraftConfig,
    base: Base = DEFAULT_BASE,
    mixture: Mixture = "1d",
    reward: Annotated[str, typer.Option(help="Reward: x (linear) or ring.")] = "x",
    t: opts.TGrid = opts.DIAGNOSE_GRID,
    states: opts.States = 512,
    tails: opts.Tails = 8,
    seed: opts.Seed = 0,
    batch: opts.DiagnoseBatch = 1024,
    out: opts.DiagnoseOut = Path("runs/toy/diagnose"),
    train_steps: opts.ProbeSteps = 0,
    quiet: opts.Quiet = False,
) -> None:
    grid = opts.t_grid(t)
    with opts.bad_parameter(ValueError):
        toy = ToyConfig(mixture=mixture, reward=reward)
    from . import train

    model = train.APP.load_or_pretrain(opts.app_base(train.APP, base, toy), toy, show_progress=not quiet)
    opts.diagnose(make_problem(toy), model, grid, states=states, tails=tails, seed=seed, batch=batch, out=out,
                  quiet=quiet, rule=graft, train_steps=train_steps, probe=dict(batch_size=256, lr=1e-3))  # probe: train's defaults
