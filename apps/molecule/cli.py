"""``pgraft molecule ...``: graph diffusion on real molecules, RDKit rewards, deduplicated P-GRAFT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

from pgraft.core import cli as opts
from pgraft.core.targets import shipped_outputs
from pgraft.core.trainer import GraftConfig, is_main_process

from .presets import PRESETS, get_preset
from .pretrain import load_base, pretrain_molecule
from .rewards import MOL_SCORES, REWARD_MAX
from .train import DEFAULT_BASE

app = typer.Typer(help="Molecule generation: masking graph diffusion, RDKit rewards, dedup GRS.",
                  no_args_is_help=True)
console = opts.make_console()

Base = Annotated[str, typer.Option(help="'shipped' (the base shipped with pgraft, the 'default' preset) or a "
                                        "base directory (pretrained with --preset first if it holds none).")]
Preset = Annotated[str, typer.Option(help=f"Pretraining preset: {', '.join(PRESETS)}.")]
Reward = Annotated[str, typer.Option(help=f"Reward: {', '.join(MOL_SCORES)} (sa = (10 - SA)/9 in [0, 1], higher "
                                          "is better; the evaluate metric sa_raw_mean is raw SA, 1-10, lower is better).")]
Novel = Annotated[bool, typer.Option("--novel/--no-novel", help="Score only novel molecules: one in the base's training "
                                     "split (same canonical SMILES) gets reward 0, like an invalid one. Recorded in "
                                     "the run's config.")]



@app.command("pretrain")
def pretrain_cmd(
    out: opts.Out = Path("runs/molecule/base"),
    preset: Preset = "default",
    dataset: Annotated[str, typer.Option(help="qm9, moses, or a .smi/.txt/.csv SMILES file.")] = "",
    steps: Annotated[int, typer.Option(help="Override the preset's training steps (0 = preset).")] = 0,
    eval_samples: Annotated[int, typer.Option(help="Molecules sampled to report validity/uniqueness.")] = 1000,
    quiet: opts.Quiet = False,
) -> None:
    """Train the base graph diffusion model (resumes an interrupted run in --out)."""
    overrides = {}
    if dataset:
        overrides["dataset"] = dataset
    if steps:
        overrides["steps"] = steps
    with opts.bad_parameter(ValueError):
        p = get_preset(preset, **overrides)
    pretrain_molecule(p, out, show_progress=not quiet, eval_samples=eval_samples)
    console.print(f"base model saved to {out}")
    if eval_samples:
        import json

        opts.print_row(json.loads((out / "eval.json").read_text()), f"base model, {eval_samples} samples")


@app.command("train")
@opts.config_file
@opts.trackers
@opts.graft_options(rule="bon", alpha=0.1, m=16, groups=32, t=0.1, rounds=10, lr=2e-4, replay=True,
                    reward_max=REWARD_MAX)
def train_cmd(
    graft: GraftConfig,
    out: opts.Out = Path("runs/molecule/train"),
    base: Base = DEFAULT_BASE,
    preset: Preset = "default",
    reward: Reward = "qed",
    sample_steps: Annotated[int, typer.Option(help="Reverse steps of the sampler.", callback=opts.at_least(1))] = 100,
    novel: Novel = False,
    resume: opts.Resume = False,
    quiet: opts.Quiet = False,
) -> None:
    """GRAFT (--t 0) or P-GRAFT rounds with a GRS rule; --dedup keys on canonical SMILES."""
    from .train import APP, MoleculeTrainConfig, train_molecule

    opts.check_choice(reward, MOL_SCORES, "reward", "--reward")
    cfg = MoleculeTrainConfig(reward=reward, sample_steps=sample_steps, base=base, preset=preset, novel=novel)
    opts.app_base(APP, base, preset)  # a bad --base is refused before anything else
    train_molecule(cfg, graft, out, resume=resume, show_progress=not quiet)
    if is_main_process():
        console.print(f"run directory: {out} (metrics.csv, store/, samples.csv, top_molecules.png, rounds.png)")


RunOrBase = Annotated[Optional[Path], typer.Argument(
    help="A `pgraft molecule train` run directory, or a base model directory (sampled alone).", show_default=False)]
BaseOnly = opts.base_only("molecule")


@app.command("sample")
def sample_cmd(
    run_dir: RunOrBase = None,
    base: BaseOnly = None,
    n: Annotated[int, typer.Option("-n", help="Number of molecules.", callback=opts.at_least(1))] = 1000,
    out: Annotated[Path, typer.Option(help="CSV path (default RUN_DIR/sampled.csv; for the shipped base "
                                           f"{shipped_outputs('molecule')}/sampled.csv).", callback=opts.output_file)] = None,
    seed: opts.Seed = 1,
    quiet: opts.Quiet = False,
) -> None:
    """Sample molecules with the fine-tuned head (T→t) and the frozen base (t→0), or with a base alone
    (its preset's sampler steps, QED as reward); writes a SMILES CSV."""
    from . import train
    from .data import is_valid_smiles
    from .train import load_run, make_problem, sample_base, sample_smiles

    target = train.APP.sample_target(run_dir, base)
    with opts.bad_parameter():
        if target.is_run:
            _, graft, app_cfg, base_model, head = load_run(target.directory)
            problem = make_problem(base_model, app_cfg.reward, app_cfg.sample_steps)
            smiles, rewards = sample_smiles(problem, head, base_model.model, n, graft.split, seed, not quiet)
        else:
            smiles, rewards = sample_base(load_base(target.directory), n, seed, not quiet)
    path = out or target.output("sampled.csv")
    pd.DataFrame({"smiles": smiles, "reward": rewards.numpy()}).to_csv(path, index=False)
    valid = sum(is_valid_smiles(s) for s in smiles)  # invalid ones come back as None or ""
    console.print(f"{len(smiles)} molecules ({valid} valid) written to {path}")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: RunOrBase = None,
    base: BaseOnly = None,
    n: Annotated[int, typer.Option("-n", help="Molecules to sample.", callback=opts.at_least(1))] = 1000,
    fcd: Annotated[bool, typer.Option("--fcd/--no-fcd", help="Also compute FCD (slower; printed with fcd_n, the "
                                      "molecules it used: FCD shrinks with n, compare it at equal n).")] = True,
    out: Annotated[Path, typer.Option(help="CSV path (default RUN_DIR/evaluation.csv; for the shipped base "
                                           f"{shipped_outputs('molecule')}/evaluation.csv).", callback=opts.output_file)] = None,
    seed: opts.Seed = 0,
    quiet: opts.Quiet = False,
) -> None:
    """Sample n molecules (run: head then base; base: alone) and print/write the metric row."""
    from . import train
    from .train import evaluate_base, evaluate_run

    target = train.APP.sample_target(run_dir, base)
    with opts.bad_parameter():
        if target.is_run:
            row = evaluate_run(target.directory, n, fcd, seed, not quiet)
        else:
            row = evaluate_base(target.directory, n, fcd, seed, not quiet)
    path = out or target.output("evaluation.csv")
    pd.DataFrame([row]).to_csv(path, index=False)
    opts.print_row(row, f"{target.directory} ({n} samples)")
    console.print(f"written to {path}")


@app.command("diagnose", help=opts.DIAGNOSE_HELP)
@opts.diagnose_options(rule="bon", alpha=0.1, m=16, groups=32, reward_max=REWARD_MAX)
def diagnose_cmd(
    graft: GraftConfig,
    base: Base = DEFAULT_BASE,
    preset: Preset = "default",
    reward: Reward = "qed",
    sample_steps: Annotated[int, typer.Option(help="Reverse steps of the sampler.", callback=opts.at_least(1))] = 100,
    novel: Novel = False,
    t: opts.TGrid = opts.DIAGNOSE_GRID,
    states: opts.States = 64,
    tails: opts.Tails = 8,
    seed: opts.Seed = 0,
    batch: opts.DiagnoseBatch = 256,
    out: opts.DiagnoseOut = Path("runs/molecule/diagnose"),
    train_steps: opts.ProbeSteps = 0,
    quiet: opts.Quiet = False,
) -> None:
    from .train import APP, make_problem

    grid = opts.t_grid(t)
    opts.check_choice(reward, MOL_SCORES, "reward", "--reward")
    model = APP.load_or_pretrain(opts.app_base(APP, base, preset), preset, show_progress=not quiet)
    with opts.bad_parameter(ValueError):
        problem = make_problem(model, reward, sample_steps, novel=novel)
    opts.diagnose(problem, model.model, grid, states=states, tails=tails, seed=seed, batch=batch, out=out,
                  quiet=quiet, rule=graft, train_steps=train_steps, probe=dict(batch_size=64, lr=2e-4))  # probe: train's defaults
