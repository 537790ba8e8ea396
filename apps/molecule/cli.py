"""``pgraft molecule ...``: graph diffusion on real molecules, RDKit rewards, deduplicated P-GRAFT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from pgraft.core import cli as opts
from pgraft.core.trainer import GraftConfig, is_main_process

from .pretrain import PRESETS, get_preset, load_base, pretrain_molecule
from .rewards import MOL_SCORES

app = typer.Typer(help="Molecule generation: masking graph diffusion, RDKit rewards, dedup GRS.",
                  no_args_is_help=True)
console = opts.make_console()

Base = Annotated[Path, typer.Option(help="Base model directory (pretrained with the preset first if missing).")]
Preset = Annotated[str, typer.Option(help=f"Pretraining preset: {', '.join(PRESETS)}.")]
Reward = Annotated[str, typer.Option(help=f"Reward: {', '.join(MOL_SCORES)}.")]


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
    try:
        p = get_preset(preset, **overrides)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    pretrain_molecule(p, out, show_progress=not quiet, eval_samples=eval_samples)
    console.print(f"base model saved to {out}")
    if eval_samples:
        import json

        opts.print_row(json.loads((out / "eval.json").read_text()), f"base model, {eval_samples} samples")


@app.command("train")
@opts.graft_options(rule="bon", alpha=0.1, m=16, groups=32, t=0.1, rounds=10, lr=2e-4, replay=True)
def train_cmd(
    graft: GraftConfig,
    out: opts.Out = Path("runs/molecule/train"),
    base: Base = Path("runs/molecule/base"),
    preset: Preset = "default",
    reward: Reward = "qed",
    sample_steps: Annotated[int, typer.Option(help="Reverse steps of the sampler.")] = 100,
    resume: opts.Resume = False,
    quiet: opts.Quiet = False,
) -> None:
    """GRAFT (--t 0) or P-GRAFT rounds with a GRS rule; --dedup keys on canonical SMILES."""
    from .train import MoleculeTrainConfig, train_molecule

    if reward not in MOL_SCORES:
        raise typer.BadParameter(f"unknown reward {reward!r}; choose one of {sorted(MOL_SCORES)}")
    cfg = MoleculeTrainConfig(reward=reward, sample_steps=sample_steps, base=str(base), preset=preset)
    train_molecule(cfg, graft, out, resume=resume, show_progress=not quiet)
    if is_main_process():
        console.print(f"run directory: {out} (metrics.csv, store/, samples.csv, top_molecules.png, rounds.png)")


@app.command("sample")
def sample_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A `pgraft molecule train` run directory.")],
    n: Annotated[int, typer.Option("-n", help="Number of molecules.")] = 1000,
    out: Annotated[Path, typer.Option(help="CSV path (default RUN_DIR/sampled.csv).")] = None,
    seed: opts.Seed = 1,
    quiet: opts.Quiet = False,
) -> None:
    """Sample molecules with the fine-tuned head (T→t) and the frozen base (t→0); writes SMILES CSV."""
    from .train import load_run, make_problem, sample_smiles

    try:
        _, graft, app_cfg, base_model, head = load_run(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    problem = make_problem(base_model, app_cfg.reward, app_cfg.sample_steps)
    smiles, rewards = sample_smiles(problem, head, base_model.model, n, graft.split, seed, not quiet)
    path = out or run_dir / "sampled.csv"
    pd.DataFrame({"smiles": smiles, "reward": rewards.numpy()}).to_csv(path, index=False)
    valid = sum(s is not None for s in smiles)
    console.print(f"{n} molecules ({valid} valid) written to {path}")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A molecule run directory, or a base model directory.")],
    n: Annotated[int, typer.Option("-n", help="Molecules to sample.")] = 1000,
    fcd: Annotated[bool, typer.Option("--fcd/--no-fcd", help="Also compute FCD (slower).")] = True,
    seed: opts.Seed = 0,
    quiet: opts.Quiet = False,
) -> None:
    """Sample n molecules and print/write the metric row (RUN_DIR/evaluation.csv)."""
    from .train import evaluate_base_row, evaluate_run

    try:
        if (run_dir / "config.json").is_file() and (run_dir / "head").is_dir():
            row = evaluate_run(run_dir, n, fcd, seed, not quiet)
        else:
            import torch

            from . import diffusion
            from .rewards import get_reward
            from .data import state_to_smiles

            base = load_base(run_dir)
            x = diffusion.sample_graphs(base.model, n, base.size_distribution, base.preset.sample_steps,
                                        torch.Generator().manual_seed(seed))
            smiles = state_to_smiles(x, base.spec.atom_types)
            row = evaluate_base_row(smiles, get_reward("qed", base.spec)(x), base, fcd, seed)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    path = run_dir / "evaluation.csv"
    pd.DataFrame([row]).to_csv(path, index=False)
    opts.print_row(row, f"{run_dir} ({n} samples)")
    console.print(f"written to {path}")
