"""``pgraft layout ...``: layout diffusion (boxes + classes), alignment/overlap rewards, P-GRAFT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

from pgraft.core import cli as opts
from pgraft.core.targets import shipped_outputs
from pgraft.core.trainer import GraftConfig, is_main_process

from .rewards import REWARD_MAX, REWARDS
from .train import DEFAULT_BASE

app = typer.Typer(help="Document layouts: box flow + class masking diffusion, alignment/overlap rewards.",
                  no_args_is_help=True)
console = opts.make_console()

Base = Annotated[str, typer.Option(help="'shipped' (the base shipped with pgraft, the 'default' preset) or a "
                                        "base directory (pretrained with --preset first if it holds none).")]
Preset = Annotated[str, typer.Option(help="Pretraining preset: tiny (tests) or default (the shipped base).")]
Reward = Annotated[str, typer.Option(help=f"Reward: {', '.join(REWARDS)}.")]



@app.command("pretrain")
def pretrain_cmd(
    out: opts.Out = Path("runs/layout/base"),
    preset: Preset = "default",
    dataset: Annotated[str, typer.Option(help="synthetic, publaynet or rico (the last two need --data).")] = "",
    data: Annotated[Path, typer.Option(help="PubLayNet COCO json / RICO directory of your own copy.")] = None,
    steps: Annotated[int, typer.Option(help="Override the preset's training steps (0 = preset).")] = 0,
    eval_samples: Annotated[int, typer.Option(help="Layouts sampled to report the base's metrics (0 = skip).")] = 256,
    quiet: opts.Quiet = False,
) -> None:
    """Train the base layout diffusion and its FID feature net (resumes an interrupted run in --out)."""
    from .presets import get_preset
    from .train import evaluate_run, pretrain_layout

    overrides: dict = {}
    if dataset:
        overrides["dataset"] = dataset
    if data is not None:
        overrides["data_path"] = str(data)
    if steps:
        overrides["steps"] = steps
    with opts.bad_parameter():
        p = get_preset(preset, **overrides)
        pretrain_layout(p, out, show_progress=not quiet)
    console.print(f"base model saved to {out}")
    if eval_samples:
        row = evaluate_run(out, eval_samples, show_progress=not quiet)
        (out / "eval.json").write_text(json.dumps(row, indent=2))
        opts.print_row(row, f"base model, {eval_samples} samples")


@app.command("train")
@opts.config_file
@opts.trackers
@opts.graft_options(alpha=0.1, groups=32, t=0.25, rounds=4, replay=True,
                    reward_max=REWARD_MAX)
def train_cmd(
    graft: GraftConfig,
    out: opts.Out = Path("runs/layout/train"),
    base: Base = DEFAULT_BASE,
    preset: Preset = "default",
    reward: Reward = "combined",
    conditional: Annotated[bool, typer.Option("--conditional/--unconditional",
                                              help="Class-conditioned fine-tuning on the test split's class sets.")] = False,
    sample_steps: Annotated[int, typer.Option(help="Reverse steps of the sampler (0 = the base preset's).")] = 0,
    final_samples: Annotated[int, typer.Option(help="Fresh layouts for evaluation.csv / samples.png.")] = 512,
    resume: opts.Resume = False,
    quiet: opts.Quiet = False,
) -> None:
    """GRAFT (--t 0) or P-GRAFT rounds with a GRS rule on a layout reward."""
    from .train import APP, LayoutTrainConfig, train_layout

    opts.check_choice(reward, REWARDS, "reward", "--reward")
    cfg = LayoutTrainConfig(reward=reward, sample_steps=sample_steps, base=base, preset=preset,
                            conditional=conditional, final_samples=final_samples)
    opts.app_base(APP, base, preset)  # a bad --base is refused before anything else
    train_layout(cfg, graft, out, resume=resume, show_progress=not quiet)
    if is_main_process():
        console.print(f"run directory: {out} (metrics.csv, store/, evaluation.csv, samples.png, rounds.png)")


RunOrBase = Annotated[Optional[Path], typer.Argument(
    help="A `pgraft layout train` run directory, or a base model directory (sampled alone).", show_default=False)]
BaseOnly = opts.base_only("layout")


@app.command("sample")
def sample_cmd(
    run_dir: RunOrBase = None,
    base: BaseOnly = None,
    n: Annotated[int, typer.Option("-n", help="Number of layouts.", callback=opts.at_least(1))] = 32,
    out: Annotated[Path, typer.Option(help="PNG path (default RUN_DIR/sampled.png; for the shipped base "
                                           f"{shipped_outputs('layout')}/sampled.png).", callback=opts.output_file)] = None,
    cols: Annotated[int, typer.Option(help="Pages per row of the PNG.")] = 8,
    seed: opts.Seed = 1,
    quiet: opts.Quiet = False,
) -> None:
    """Sample layouts (fine-tuned head T→t, frozen base t→0; or a base alone) and render them as PNG pages."""
    from . import train
    from .render import render_grid
    from .train import sample_run

    target = train.APP.sample_target(run_dir, base)
    with opts.bad_parameter():
        layouts, rewards, _ = sample_run(target.directory, n, seed, not quiet)
    path = render_grid(layouts, out or target.output("sampled.png"), n_cols=cols,
                       titles=[f"r={r:.2f}" for r in rewards.tolist()])
    console.print(f"{n} layouts (mean reward {rewards.mean():.4f}) rendered to {path}")


def _count_or_default(value: Optional[int]) -> Optional[int]:
    """:func:`pgraft.core.cli.at_least` (1) for an optional count (None = the protocol's default)."""
    return None if value is None else opts.at_least(1)(value)


def _protocol(value: str) -> str:
    from .train import PROTOCOLS

    if value not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {value!r}; choose one of {', '.join(PROTOCOLS)}")
    return value


# printed names of the evaluate row's raw scores (the CSV keeps the plain keys)
_PRINTED_NAMES = {"alignment": "alignment (raw; LayoutGAN++ prints ×100)",
                  "overlap": "overlap (raw; LayoutGAN++ prints ×100)"}


def _print_evaluation(row: dict, title: str) -> None:
    """The evaluate row as a table: raw alignment / overlap say so, and Max-IoU is followed by its
    coverage and by how many generated / reference layouts entered it."""
    opts.print_row({_PRINTED_NAMES.get(k, k): v for k, v in row.items()}, title)
    if "max_iou" in row:
        coverage = row.get("max_iou_coverage", 0.0)
        matched = (f"{coverage:.1%} of those generated layouts have a class multiset found in the reference "
                   "and enter its mean, the others are left out" if coverage > 0 else
                   "no generated layout has a class multiset found in the reference: its 0 means 'undefined'")
        console.print(f"max_iou: {row.get('max_iou_n')} generated vs {row.get('max_iou_ref_n')} reference layouts; "
                      f"{matched}. Max-IoU grows with the reference size: compare it only at equal max_iou_ref_n.")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: RunOrBase = None,
    base: BaseOnly = None,
    n: Annotated[Optional[int], typer.Option(
        "-n", help="Layouts to sample (default: 1000; --protocol layoutdm: one per test layout, a smaller n "
                   "conditions on the first n test layouts only).", callback=_count_or_default,
        show_default=False)] = None,
    protocol: Annotated[str, typer.Option(
        help="unconditional: the run's own sampler, max-IoU between the first 1000 layouts of each set; "
             "layoutdm: LayoutDM's label-conditioned protocol, one layout per test layout with its classes "
             "clamped, every metric against the full test split.", callback=_protocol)] = "unconditional",
    out: Annotated[Path, typer.Option(help="CSV path (default RUN_DIR/evaluation.csv; for the shipped base "
                                           f"{shipped_outputs('layout')}/evaluation.csv).", callback=opts.output_file)] = None,
    seed: opts.Seed = 0,
    quiet: opts.Quiet = False,
) -> None:
    """Sample layouts; write the metric row (FID, alignment, overlap, max-IoU, class TV, reward) as CSV."""
    from . import train
    from .train import evaluate_run

    target = train.APP.sample_target(run_dir, base)
    with opts.bad_parameter():
        row = evaluate_run(target.directory, n, seed, not quiet, protocol=protocol)
    path = out or target.output("evaluation.csv")
    pd.DataFrame([{"run": str(target.directory), **row}]).to_csv(path, index=False)
    _print_evaluation(row, f"{target.directory} ({row['n']} samples, {protocol} protocol)")
    console.print(f"written to {path}")


@app.command("diagnose", help=opts.DIAGNOSE_HELP)
@opts.diagnose_options(alpha=0.1, groups=32, reward_max=REWARD_MAX)
def diagnose_cmd(
    graft: GraftConfig,
    base: Base = DEFAULT_BASE,
    preset: Preset = "default",
    reward: Reward = "combined",
    conditional: Annotated[bool, typer.Option("--conditional/--unconditional",
                                              help="Class-conditioned, on the test split's class sets, as train's "
                                                   "--conditional; R² is then measured within a class set (4 "
                                                   "states each).")] = False,
    sample_steps: Annotated[int, typer.Option(help="Reverse steps of the sampler (0 = the base preset's).")] = 0,
    t: opts.TGrid = opts.DIAGNOSE_GRID,
    states: opts.States = 64,
    tails: opts.Tails = 8,
    seed: opts.Seed = 0,
    batch: opts.DiagnoseBatch = 256,
    out: opts.DiagnoseOut = Path("runs/layout/diagnose"),
    train_steps: opts.ProbeSteps = 0,
    quiet: opts.Quiet = False,
) -> None:
    from .train import APP, LayoutTrainConfig, problem_for

    grid = opts.t_grid(t)
    opts.check_choice(reward, REWARDS, "reward", "--reward")
    cfg = LayoutTrainConfig(reward=reward, sample_steps=sample_steps, base=base, preset=preset,
                            conditional=conditional)
    model = APP.load_or_pretrain(opts.app_base(APP, base, preset), preset, show_progress=not quiet)
    with opts.bad_parameter(ValueError):
        problem = problem_for(cfg, model)
    opts.diagnose(problem, model.model, grid, states=states, tails=tails, seed=seed, batch=batch, out=out,
                  quiet=quiet, rule=graft, train_steps=train_steps, probe=dict(batch_size=64, lr=1e-4))  # probe: train's defaults
