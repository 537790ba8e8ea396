"""``pgraft toy ...``: the closed-form Gaussian-mixture world."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from pgraft.core import cli as opts
from pgraft.core.checkpoint import load_pretrained
from pgraft.core.trainer import GraftConfig, is_main_process, run_graft, sample_finetuned

from .data import MIXTURES
from .model import ToyDenoiser
from .train import ToyConfig, load_or_pretrain, make_problem, pretrain_toy

app = typer.Typer(help="Closed-form toy: Gaussian mixtures, exact GRS targets.", no_args_is_help=True)

Mixture = Annotated[str, typer.Option(help=f"Mixture: {', '.join(MIXTURES)}.")]
Base = Annotated[Path, typer.Option(help="Base model directory (pretrained first if missing).")]


@app.command("pretrain")
def pretrain_cmd(out: opts.Out = Path("runs/toy/base"), mixture: Mixture = "1d",
                 steps: Annotated[int, typer.Option(help="Training steps.")] = 3000,
                 seed: opts.Seed = 0, quiet: opts.Quiet = False) -> None:
    """Train the tiny base diffusion model on the mixture (seconds)."""
    pretrain_toy(ToyConfig(mixture=mixture, pretrain_steps=steps, seed=seed), out, show_progress=not quiet)
    typer.echo(f"base model saved to {out}")


@app.command("train")
@opts.graft_options(rule="rs", k=1, groups=256, rounds=1, train_steps=500, batch_size=256, lr=1e-3,
                    sample_batch_size=512)
def train_cmd(
    graft: GraftConfig,
    out: opts.Out = Path("runs/toy/graft"),
    base: Base = Path("runs/toy/base"),
    mixture: Mixture = "1d",
    reward: Annotated[str, typer.Option(help="Reward: x (linear) or ring.")] = "x",
    resume: opts.Resume = False,
    quiet: opts.Quiet = False,
) -> None:
    """GRAFT (--t 0) or P-GRAFT (--t > 0) rounds on the toy with any GRS rule."""
    toy = ToyConfig(mixture=mixture, reward=reward)
    problem = make_problem(toy)
    if graft.dedup:
        from pgraft.core.dedup import tensor_key

        problem.key = lambda x: [tensor_key(row, 2) for row in x]
    model = load_or_pretrain(toy, base, show_progress=not quiet)
    _, table = run_graft(problem, model, toy.model_config(), graft, out,
                         app_config={"toy": asdict(toy), "base": str(base)}, resume=resume, show_progress=not quiet)
    if is_main_process():
        typer.echo(f"metrics: {out / 'metrics.csv'}  fine-tuned model: {out / 'head'}")


@app.command("sample")
def sample_cmd(run_dir: Annotated[Path, typer.Argument(help="A `pgraft toy train` run directory.")],
               n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 1000,
               seed: opts.Seed = 1, quiet: opts.Quiet = False) -> None:
    """Sample the fine-tuned model (head T→t, frozen base t→0); writes RUN_DIR/samples.csv."""
    import json

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise typer.BadParameter(f"{run_dir} is not a run directory (no config.json)")
    config = json.loads(config_path.read_text())
    toy = ToyConfig(**config["app"]["toy"])
    cfg = GraftConfig.from_dict(config["graft"])
    head = load_pretrained(ToyDenoiser, run_dir / "head").eval()
    base = load_pretrained(ToyDenoiser, config["app"]["base"]).eval()
    _, x0 = sample_finetuned(make_problem(toy), head, base, n, cfg.split, seed, show_progress=not quiet)
    path = run_dir / "samples.csv"
    pd.DataFrame(x0.numpy(), columns=[f"x{i}" for i in range(x0.shape[1])]).to_csv(path, index=False)
    typer.echo(f"{n} samples written to {path}; mean {x0.mean(0).tolist()}")
