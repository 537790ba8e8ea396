"""``pgraft t2i ...``: text-to-image GRAFT / P-GRAFT, on the embedded shapes world or a local
Stable Diffusion checkpoint (``--model PATH``)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

from pgraft.core import cli as opts
from pgraft.core.targets import shipped_outputs
from pgraft.core.trainer import GraftConfig, is_main_process

from . import DEFAULT_ANCHOR
from .presets import DEFAULT_MODEL, DEFAULT_SCORER, SHIPPED_BASE, resolve_model

app = typer.Typer(help="Text-to-image: compositional shapes world (CPU) or a local Stable Diffusion pipeline.",
                  no_args_is_help=True)


def _reward_norm(value: str) -> str:
    """typer callback of --reward-norm."""
    from .reward_spec import NORMS

    if value not in NORMS:
        raise typer.BadParameter(f"must be raw or zscore (per scoring call), zscore-round or rank (per round), "
                                 f"got {value!r}")
    return value


Model = Annotated[str, typer.Option("--model", help="'shipped' (the shapes-world base shipped with pgraft), a "
                                                     "pipeline directory: `pgraft t2i pretrain` output or a local "
                                                      "diffusers Stable Diffusion checkpoint (UNet + DDIM, or a "
                                                      "flow-matching pipeline: SD3 / SD3.5, FLUX.1, Qwen-Image, "
                                                      "SANA), or a hub id ORG/NAME already in the local Hugging "
                                                      "Face cache (never downloaded).")]
Prompts = Annotated[str, typer.Option(help="Prompt set: train, heldout, all, geneval, or a .txt/.csv/.jsonl file.")]
Reward = Annotated[str, typer.Option(help=(
    "Reward: a name: vqa (learned scorer), checker (exact), clipscore, itm (BLIP image-text matching), vqascore, "
    "pickscore, hpsv2, imagereward, aesthetic, clipflant5 (local weights via --reward-weights; docs: Rewards); "
    "a reward server http(s)://HOST:PORT/PATH (POST {\"prompts\": [B strings], \"images\": [B base64 PNGs]} -> "
    "{\"scores\": [B numbers]}; options after #: timeout=S&attempts=N, default 60 s, 3 attempts; "
    "see `pgraft t2i serve-reward`); your own MODULE:FUNCTION or path/to/file.py:FUNCTION, called as "
    "fn(images: float tensor [B,3,H,W] in [0,1], prompts: a list of B str) -> tensor [B] or B floats; "
    "a weighted sum ITEM:WEIGHT,ITEM:WEIGHT of these, e.g. checker:0.5,clipscore:0.5 (weight: a number, "
    "default 1; need not sum to 1); or a .json file {\"checker\": 0.5, \"clipscore\": 0.5}. "
    "Each component's mean is logged as reward_<name>_mean."))]
RewardNorm = Annotated[str, typer.Option(help=(
    "How a weighted --reward combines its components: raw (sum of weight x score); zscore (each component "
    "z-scored over the images of each scoring call, then weighted: per chunk of --sample-batch-size candidates "
    "in train); zscore-round (each component z-scored over the whole round's candidates, then weighted); rank "
    "(weighted sum of each component's rank within its group, in [0, 1]: GRS accepts on the rank sum). "
    "zscore-round and rank treat one evaluate / serve-reward call as one round of one group."),
    callback=_reward_norm)]
RewardWeights = Annotated[Optional[str], typer.Option(help="Weights directory of the reward (vqa: 'shipped', the "
                                                            "scorer shipped with pgraft, or `pgraft t2i train-scorer` output; clipscore/itm/vqascore: "
                                                            "a local transformers model: CLIP, BLIP ITM, a VQA model "
                                                            "such as LLaVA); shared by the components of a weighted "
                                                            "--reward (a .json file can give each its own).")]
Steps = Annotated[int, typer.Option("--n-steps", help="Sampler steps (DDIM; Euler on the scheduler's shifted sigmas "
                                                       "for SD3).")]
Eta = Annotated[Optional[float], typer.Option(
    help="Sampler noise. DDIM eta for UNet pipelines (default 1: DDPM-like; 0 deterministic); for flow-matching (SD3) "
         "pipelines Flow-GRPO's SDE noise level (default 0: deterministic Euler; e.g. 0.7 as Flow-GRPO).")]
Precision = Annotated[str, typer.Option(
    help="Dtype of the frozen parts of a flow pipeline (SD3 / FLUX / Qwen-Image / SANA): fp32, bf16 or fp16; LoRA "
         "parameters and optimizer state stay fp32. UNet pipelines: fp32 only.")]
GradientCheckpointing = Annotated[bool, typer.Option(
    "--gradient-checkpointing", help="Recompute the transformer's (UNet's) activations in the backward pass.")]
ImageSize = Annotated[Optional[int], typer.Option(
    help="Resolution a flow pipeline samples (default: the family's, e.g. 1024 for FLUX.1).")]
Guidance = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's).")]



PerPrompt = Annotated[int, typer.Option(help="Images per prompt.", callback=opts.at_least(1))]


@app.command("pretrain")
def pretrain_cmd(
    out: opts.Out = Path("runs/t2i/base"),
    preset: Annotated[str, typer.Option(help="Model size: tiny (tests) or default (the shipped base).")] = "default",
    prompts: Prompts = "train",
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the preset's budget).")] = None,
    batch_size: opts.BatchSize = 32,
    lr: opts.LR = 1e-3,
    n_images: Annotated[int, typer.Option(help="Rendered training images.")] = 30000,
    seed: opts.Seed = 0,
    quiet: opts.Quiet = False,
) -> None:
    """Train the embedded world's base model (UNet + CLIP text encoder); resumes if OUT holds a partial run."""
    from .train import PRETRAIN_STEPS, PretrainT2IConfig, pretrain_world

    with opts.bad_parameter():
        cfg = PretrainT2IConfig(preset=preset, prompts=prompts, steps=steps or PRETRAIN_STEPS.get(preset, 4000),
                                batch_size=batch_size, lr=lr, n_images=n_images, seed=seed)
        pretrain_world(cfg, out, show_progress=not quiet)
    typer.echo(f"base pipeline saved to {out}")


@app.command("train-scorer")
def train_scorer_cmd(
    out: opts.Out = Path("runs/t2i/scorer"),
    prompts: Prompts = "all",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
    image_size: Annotated[int, typer.Option(help="Render size (match the base model's).")] = 32,
    seed: opts.Seed = 0,
    quiet: opts.Quiet = False,
) -> None:
    """Train the learned VQA-style reward P(yes | image, prompt) on rendered images."""
    from .rewards import ScorerTrainConfig, train_scorer

    _, metrics = train_scorer(ScorerTrainConfig(prompts=prompts, steps=steps,
                                                image_size=image_size, seed=seed), out, show_progress=not quiet)
    typer.echo(f"scorer saved to {out}: {json.dumps(metrics)}")


def _reward_max(kw: dict) -> float | None:
    """The declared upper bound of the command's --reward (``rewards.declared_max``; None when unknown)."""
    from .rewards import declared_max

    return declared_max(kw["reward"], kw["reward_norm"])


@app.command("train")
@opts.config_file
@opts.trackers
@opts.graft_options(fixed={"dedup": False}, groups=16, t=0.25, rounds=4, batch_size=32, lora=8,
                    anchor=DEFAULT_ANCHOR, reward_max=_reward_max)
def train_cmd(
    graft: GraftConfig,
    out: opts.Out = Path("runs/t2i/graft"),
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = "train",
    reward: Reward = "vqa",
    reward_weights: RewardWeights = DEFAULT_SCORER,
    reward_norm: RewardNorm = "raw",
    n_steps: Steps = 20,
    eta: Eta = None,
    guidance: Guidance = None,
    cond_dropout: Annotated[float, typer.Option(
        help="Also train the unconditional eps (classifier-free guidance) on this fraction of accepted images.")] = 0.0,
    sample_batch_size: Annotated[int, typer.Option(help="Images per sampler call.")] = 64,
    nonfinite_reward: Annotated[Optional[float], typer.Option(
        "--nonfinite-reward", help="What a NaN or infinite reward score counts as (recorded in the run's config); "
                                   "without it such a score stops the run, naming the reward.")] = None,
    precision: Precision = "fp32",
    gradient_checkpointing: GradientCheckpointing = False,
    image_size: ImageSize = None,
    resume: opts.Resume = False,
    quiet: opts.Quiet = False,
) -> None:
    """GRAFT (--t 0) or P-GRAFT (--t > 0) rounds over a prompt set: M images per prompt, GRS per prompt."""
    from .train import T2IConfig, train_t2i

    cfg = replace(graft, sample_batch_size=sample_batch_size)
    app_cfg = T2IConfig(model=str(model), prompts=prompts, reward=reward,
                        reward_weights=None if reward_weights is None else str(reward_weights),
                        n_steps=n_steps, eta=eta, guidance_scale=guidance, cond_dropout=cond_dropout,
                        reward_norm=reward_norm, reward_nonfinite=nonfinite_reward, precision=precision,
                        gradient_checkpointing=gradient_checkpointing, image_size=image_size)
    if nonfinite_reward is not None and not math.isfinite(nonfinite_reward):
        raise typer.BadParameter(f"must be a finite number, got {nonfinite_reward}", param_hint="--nonfinite-reward")
    with opts.bad_parameter(ValueError, FileNotFoundError, FileExistsError):
        train_t2i(app_cfg, cfg, out, resume=resume, show_progress=not quiet)
    if is_main_process():
        typer.echo(f"metrics: {out / 'metrics.csv'}  grids: {out / 'grids'}  LoRA: {out / 'lora'}")


def _run_config(run_dir: Path) -> tuple[dict, GraftConfig]:
    from pgraft.core.state import read_json

    path = run_dir / "config.json"
    if not path.is_file():
        raise typer.BadParameter(f"{run_dir} is not a `pgraft t2i train` run directory (no config.json)")
    config = read_json(path, keys=("app",), fix="restore it, or point at another run directory")
    if "t2i" not in config.get("app", {}):
        raise typer.BadParameter(f"{run_dir} is a run of another app, not `pgraft t2i train`")
    return config["app"]["t2i"], GraftConfig.from_dict(config["graft"])


RunOrBase = Annotated[Optional[Path], typer.Argument(
    help="A `pgraft t2i train` run directory, or a base pipeline directory (sampled alone).", show_default=False)]
BaseOnly = opts.base_only("t2i", ships=SHIPPED_BASE.is_dir())


@app.command("sample")
def sample_cmd(
    run_dir: RunOrBase = None,
    base: BaseOnly = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt set or file (default: the run's; a base's: "
                                                        "train).")] = None,
    per_prompt: PerPrompt = 4,
    max_prompts: Annotated[int, typer.Option(help="Use at most this many prompts.", callback=opts.at_least(1))] = 16,
    out: Annotated[Optional[Path], typer.Option(help="Folder for grid.png and images.safetensors "
                                                     "(default RUN_DIR/samples).")] = None,
    seed: opts.Seed = 1,
    quiet: opts.Quiet = False,
) -> None:
    """Sample the fine-tuned model (head T→t, frozen base t→0), or a base alone (DDIM as `train` samples by
    default: 20 steps, eta 1 (SD3: Euler), the pipeline's guidance); writes RUN_DIR/samples/{grid.png,images.safetensors}."""
    from pgraft.core.state import save_state

    from .prompts import load_prompts
    from .train import APP, T2IConfig, load_head, load_pipeline, sample_images, save_grid

    target = APP.sample_target(run_dir, base)
    with opts.bad_parameter():
        if target.is_run:
            app_cfg, cfg = _run_config(target.directory)
            pipe = load_pipeline(app_cfg["model"], app_cfg.get("guidance_scale"), app_cfg.get("precision", "fp32"),
                                 app_cfg.get("image_size"))
            head = load_head(target.directory, pipe.denoiser)
            split, n_steps, eta, default_prompts = cfg.split, app_cfg["n_steps"], app_cfg["eta"], app_cfg["prompts"]
        else:
            pipe, defaults = load_pipeline(target.directory), T2IConfig()
            head, split, n_steps, eta, default_prompts = pipe.denoiser, 0.0, defaults.n_steps, defaults.eta, "train"
        names = load_prompts(prompts or default_prompts).prompts[:max_prompts]
    images, plist = sample_images(pipe, head, names, per_prompt, split, n_steps, eta, seed, show_progress=not quiet)
    out = out or target.output("samples")
    save_grid(images, out / "grid.png", plist, ncol=per_prompt)
    save_state(images, out / "images.safetensors")
    typer.echo(f"{len(plist)} images written to {out}")


@app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    run_dir: RunOrBase = None,
    base: BaseOnly = None,
    model: Model = DEFAULT_MODEL,
    run: Annotated[Optional[Path], typer.Option(help="A `pgraft t2i train` run to evaluate (default: the base; "
                                                     "the same as RUN_DIR).")] = None,
    suite: Annotated[Optional[str], typer.Option(help=(
        "Evaluation suite: geneval, drawbench, genai-bench, ocr or shapes. Sets the benchmark's prompts (drawbench, "
        "genai-bench, ocr: your copy, --prompts PATH), images per prompt and seed (flags override); writes "
        "per-category means of every reward (categories.csv/.png), grid.png and the reward-hacking panel "
        "(panel.csv: the training reward beside every other; a run is compared with its base, same seeds). "
        "The training reward: --reward, else the run's."), show_default=False)] = None,
    panel: Annotated[Optional[str], typer.Option(help=(
        "With --suite: more rewards scored on the same images, comma-separated: NAME=WEIGHTS_DIR (a reward of "
        "--reward with local weights, e.g. clipscore=DIR), LABEL=http://HOST:PORT/ (a reward server, e.g. "
        "geneval=... of servers/geneval) or a weight-free NAME. The exact checker and the shipped scorer join "
        "on prompts of the shapes world."), show_default=False)] = None,
    compare_base: Annotated[bool, typer.Option("--compare-base/--no-compare-base", help=(
        "With --suite and a run: also sample its base with the same seeds and report each reward's change."))] = True,
    prompts: Prompts = "heldout",
    per_prompt: PerPrompt = 4,
    reward: Reward = "vqa",
    reward_weights: RewardWeights = DEFAULT_SCORER,
    reward_norm: RewardNorm = "raw",
    n_steps: Steps = 20,
    eta: Eta = None,
    guidance: Guidance = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write the tables and grid "
                                                                "(default: RUN/eval or MODEL/eval).")] = None,
    seed: opts.Seed = 2,
    quiet: opts.Quiet = False,
) -> None:
    """Per-category GenEval-style accuracy (exact checker) and mean reward on a prompt set, of a run (RUN_DIR or
    --run) or of a base alone (RUN_DIR, --base or --model). With --suite: a benchmark's protocol, every reward's
    per-category means and the reward-hacking panel (RUN/eval/suite_NAME)."""
    from .prompts import load_prompts
    from .rewards import make_reward
    from .train import APP, evaluate_images, load_head, load_pipeline, sample_images, save_grid

    if run_dir is not None or base is not None:
        if run is not None:
            given = str(run_dir) if run_dir is not None else f"--base {base}"
            raise typer.BadParameter(f"give one of RUN_DIR, --base and --run, not {given} and --run {run}",
                                     param_hint="--run")
        target = APP.sample_target(run_dir, base)
        if target.is_run:
            run = target.directory
        else:
            model = target.directory
            out = out or target.outputs / "eval"
    split = 0.0
    if run is not None:
        app_cfg, cfg = _run_config(run)
        model, split = app_cfg["model"], cfg.split
        n_steps, eta = app_cfg["n_steps"], app_cfg["eta"]
        guidance = guidance if guidance is not None else app_cfg.get("guidance_scale")
    if suite is not None:  # the benchmark protocol and the reward-hacking panel (suites.py)
        from .presets import SHIPPED_SCORER
        from .suites import PanelEntry, build_panel, get_suite, run_suite

        def given(name: str) -> bool:
            source = ctx.get_parameter_source(name)
            return source is not None and source.name != "DEFAULT"

        the_suite = get_suite(suite)
        if run is not None and not given("reward"):
            reward, reward_weights = app_cfg["reward"], app_cfg.get("reward_weights")
            reward_norm = app_cfg.get("reward_norm", "raw")
        with opts.bad_parameter():
            prompt_set = the_suite.load(prompts if given("prompts") else None)
            pipe = load_pipeline(model, guidance)
            training = PanelEntry(reward, "training", make_reward(reward, reward_weights, norm=reward_norm))
            entries = build_panel(training, panel, prompt_set.in_grammar(),
                                  shipped_scorer=DEFAULT_SCORER if SHIPPED_SCORER.is_dir() else None)
        per_prompt = per_prompt if given("per_prompt") else the_suite.per_prompt
        seed = seed if given("seed") else the_suite.seed
        models = [("base", (pipe.denoiser, 0.0))]
        if run is not None:
            finetuned = ("finetuned", (load_head(run, pipe.denoiser), split))
            models = [*models, finetuned] if compare_base else [finetuned]

        def sample(head_split, names, k, s):
            return sample_images(pipe, head_split[0], names, k, head_split[1], n_steps, eta, s,
                                 show_progress=not quiet)

        if not given("out"):
            model_dir = resolve_model(model)
            shipped = SHIPPED_BASE.is_dir() and model_dir.resolve() == SHIPPED_BASE.resolve()
            root = out or (run / "eval" if run is not None else (shipped_outputs("t2i") if shipped else model_dir)
                           / "eval")
            out = root / f"suite_{suite}"
        side = getattr(getattr(pipe, "info", None), "image_size", None)
        typer.echo(f"suite {suite}: {len(prompt_set)} prompts ({prompt_set.source}) x {per_prompt} images, seed {seed}"
                   + (f"; the protocol has {the_suite.expected} prompts" if the_suite.expected not in (None,
                                                                                                  len(prompt_set))
                      else "")
                   + (f"; sampled at {side} px (protocol: {the_suite.resolution})"
                      if the_suite.resolution and side and side != the_suite.resolution else ""))
        result = run_suite(the_suite, prompt_set, entries, sample, models, per_prompt, seed, out, save_grid,
                           used={"model": str(model), "run": None if run is None else str(run), "n_steps": n_steps,
                                 "eta": eta, "guidance": guidance, "image_size": side})
        with pd.option_context("display.width", 250, "display.precision", 3, "display.max_columns", 60):
            typer.echo(f"per category ({the_suite.reports}):")
            typer.echo(result.categories.to_string())
            typer.echo("reward-hacking panel (overall = mean of the category means; the training reward first):")
            typer.echo(result.panel.to_string())
        headline = the_suite.headline if the_suite.headline in result.panel.index else reward
        typer.echo(f"{suite} headline, {headline} overall: "
                   + ", ".join(f"{k} {v:+.3f}" if k == "change" else f"{k} {v:.3f}"
                               for k, v in result.panel.loc[headline].drop("role").items()))
        typer.echo(f"written to {out}")
        return
    with opts.bad_parameter():
        pipe = load_pipeline(model, guidance)
        reward_fn = make_reward(reward, reward_weights, norm=reward_norm)
        names = load_prompts(prompts).prompts
    head = load_head(run, pipe.denoiser) if run is not None else pipe.denoiser
    images, plist = sample_images(pipe, head, names, per_prompt, split, n_steps, eta, seed, show_progress=not quiet)
    name = "finetuned" if run is not None else "base"
    samples, table = evaluate_images(images, plist, {reward: reward_fn}, name)
    if out is None:  # beside the run, or the base (the shipped one's outside the package)
        model_dir = resolve_model(model)
        shipped = SHIPPED_BASE.is_dir() and model_dir.resolve() == SHIPPED_BASE.resolve()
        out = run / "eval" if run is not None else (shipped_outputs("t2i") if shipped else model_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    samples.to_csv(out / f"samples_{prompts if '/' not in prompts else 'file'}.csv", index=False)
    save_grid(images[: 8 * per_prompt], out / "grid.png", plist[: 8 * per_prompt], ncol=per_prompt)
    if table is not None:
        table.to_csv(out / "accuracy.csv")
        with pd.option_context("display.width", 200, "display.precision", 3):
            typer.echo(table.to_string())
    else:
        typer.echo(f"mean {reward}: {samples[reward].mean():.4f} (prompts outside the world grammar: no checker)")
    typer.echo(f"written to {out}")


@app.command("diagnose")
@opts.diagnose_options(probe=False, groups=16, reward_max=_reward_max)
def diagnose_cmd(
    graft: GraftConfig,
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = "train",
    reward: Reward = "vqa",
    reward_weights: RewardWeights = DEFAULT_SCORER,
    reward_norm: RewardNorm = "raw",
    n_steps: Steps = 20,
    eta: Eta = None,
    guidance: Guidance = None,
    t: opts.TGrid = opts.DIAGNOSE_GRID,
    states: opts.States = 64,
    tails: opts.Tails = 8,
    seed: opts.Seed = 0,
    batch: opts.DiagnoseBatch = 64,
    out: opts.DiagnoseOut = Path("runs/t2i/diagnose"),
    quiet: opts.Quiet = False,
) -> None:
    """Which P-GRAFT split --t to train with, from the base pipeline (--model) alone: the share R²(t) of the
    reward's variance within a prompt that X_t already decides (n states × K base tails per t, 4 states per
    prompt: GRS selects among images of one prompt; 95% intervals), and the kept share: the share of GRAFT's
    per-round gain that P-GRAFT keeps at t under the GRS rule of --rule/--m/--k/--alpha/--threshold/--reward-max
    (train's defaults), simulated within prompts on the states × tails (assumes perfect learning of the accepted
    X_t, one round, acceptance by the reward alone). Recommends the largest t whose kept-share lower bound is
    >= 0.5 (R²'s when no kept share can be estimated)."""
    from .prompts import load_prompts
    from .train import APP, T2IConfig, load_pipeline, recorded_problem

    grid = opts.t_grid(t)
    lacks = APP.lacks(opts.app_base(APP, model))  # `shipped` (verified) or a directory that exists
    if lacks is not None:
        raise typer.BadParameter(f"{model} is not a base pipeline directory ({lacks}); train one with "
                                 "`pgraft t2i pretrain`", param_hint="--model")
    app_cfg = T2IConfig(model=str(model), prompts=prompts, reward=reward,
                        reward_weights=None if reward_weights is None else str(reward_weights),
                        n_steps=n_steps, eta=eta, guidance_scale=guidance, reward_norm=reward_norm)
    with opts.bad_parameter(ValueError, FileNotFoundError):
        pipe = load_pipeline(app_cfg.model, app_cfg.guidance_scale)
        problem = recorded_problem(pipe, app_cfg, load_prompts(prompts).prompts, out)
    opts.diagnose(problem, pipe.denoiser, grid, states=states, tails=tails, seed=seed, batch=batch, out=out,
                  quiet=quiet, rule=graft)


@app.command("serve-reward")
def serve_reward_cmd(
    reward: Annotated[str, typer.Option(help="The reward to serve: any local --reward of `pgraft t2i train` (a name, "
                                             "MODULE:FUNCTION, a weighted list, a .json file).")],
    reward_weights: RewardWeights = None,
    reward_norm: RewardNorm = "raw",
    host: Annotated[str, typer.Option(help="Address to listen on: 127.0.0.1 (this machine only) or e.g. 0.0.0.0 "
                                           "(every interface; the server has no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port, printed).", min=0, max=65535)] = 8000,
    device: opts.Device = "cpu",
    quiet: opts.Quiet = False,
) -> None:
    """Serve a reward over HTTP for `--reward http://HOST:PORT/` (reference server, http.server): POST
    {"prompts": [B strings], "images": [B base64 PNGs]} -> {"scores": [B numbers]}; GET describes it. One batch
    is scored at a time. Ctrl-C stops it."""
    from .remote import is_url, make_server
    from .rewards import make_reward

    if is_url(reward):
        raise typer.BadParameter("serve a local reward, not a URL", param_hint="--reward")
    with opts.bad_parameter(ValueError, FileNotFoundError, param_hint="--reward"):
        reward_fn = make_reward(reward, reward_weights, opts.device_option(device), norm=reward_norm)
    try:
        server = make_server(reward_fn, host, port, name=reward, quiet=quiet)
    except (OSError, OverflowError) as err:
        raise typer.BadParameter(f"cannot listen on {host}:{port} ({getattr(err, 'strerror', None) or err})",
                                 param_hint="--port") from None
    typer.echo(f"serving reward {reward!r} at {server.url} (use --reward {server.url}); Ctrl-C to stop", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command("convert-reward")
@opts.run_errors
def convert_reward_cmd(
    name: Annotated[str, typer.Argument(help="The named reward: hpsv2, aesthetic, imagereward or clipflant5.",
                                        show_default=False)],
    src: Annotated[Path, typer.Argument(help="Its reference checkpoint: HPS_v2.1_compressed.pt, "
                                             "sac+logos+ava1-l14-linearMSE.pth or ImageReward.pt (torch files are "
                                             "read without unpickling), or the same as .safetensors; clipflant5: "
                                             "the zhiqiulin/clip-flant5-xl (-xxl) directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="New directory to write; then use --reward NAME "
                                                    "--reward-weights OUT.", show_default=False)],
    clip: Annotated[Optional[str], typer.Option(help="aesthetic: a CLIP ViT-L/14 directory with safetensors weights "
                                                     "(e.g. an openai/clip-vit-large-patch14 snapshot), copied into "
                                                     "OUT; clipflant5: its vision tower, an "
                                                     "openai/clip-vit-large-patch14-336 snapshot.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="hpsv2: a CLIP tokenizer directory (e.g. a "
                                                          "laion/CLIP-ViT-H-14-laion2B-s32B-b79K snapshot); "
                                                          "imagereward: a BERT tokenizer (e.g. bert-base-uncased); "
                                                          "clipflant5: google/flan-t5-xl (-xxl). A hub id already in "
                                                          "the local Hugging Face cache works too.")] = None,
    med_config: Annotated[Optional[Path], typer.Option(help="imagereward: ImageReward's med_config.json (default: "
                                                            "BLIP's BERT: 64-wide heads, eps 1e-12).")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of the written weights: float32, float16 or bfloat16.")] = "float32",
) -> None:
    """Convert a named reward's reference checkpoint into the directory `--reward NAME --reward-weights OUT` loads
    (safetensors and JSON; the checkpoint is never unpickled). See docs/apps/t2i.md, "Converting the reference
    weights"."""
    from .convert_rewards import CONVERTERS, DTYPES, ConvertOptions, convert_reward

    opts.check_choice(name, CONVERTERS, "reward", "NAME")
    opts.check_choice(dtype, DTYPES, "dtype", "--dtype")
    written = convert_reward(name, src, out, ConvertOptions(clip=clip, tokenizer=tokenizer, med_config=med_config,
                                                            dtype=dtype))
    typer.echo(f"{name} weights written to {written}; use --reward {name} --reward-weights {written}")


# ----------------------------------------------------------------------------- inverse noise correction (flow families)
INC_NOTE = ("Unconditional in the prompt: the noises are inverted with the empty prompt (or the --captions given "
            "to `invert`) at guidance 1, and the corrector sees no text.")
FlowModel = Annotated[Path, typer.Option("--model", help="A flow-matching pipeline directory (SD3 / SD3.5, FLUX.1, "
                                                          "Qwen-Image, SANA): INC inverts its deterministic Euler "
                                                          "sampler.",
                                         show_default=False)]
IncSteps = Annotated[int, typer.Option("--n-steps", "--steps", help="Base sampler steps to invert through (Euler on "
                                                                    "the scheduler's shifted sigmas); sample with the "
                                                                    "same count.")]


def _flow_model(model: Path) -> Path:
    """``--model`` of the INC commands: a flow pipeline directory (any flow family), else a one-line usage error."""
    from .flow_inc import flow_model_lacks

    lacks = flow_model_lacks(model)
    if lacks is not None:
        raise typer.BadParameter(lacks, param_hint="--model")
    return model


@app.command("invert")
@opts.run_errors
def invert_cmd(
    images: Annotated[Path, typer.Argument(help="A folder of PNG/JPG images (sorted by name; centre-cropped and "
                                                "resized to the model's size) or a .safetensors tensor [N, 3, H, W] "
                                                "in [-1, 1].", show_default=False)],
    model: FlowModel,
    out: opts.Out = Path("runs/t2i/invert"),
    captions: Annotated[Optional[Path], typer.Option(help="Per-image captions to invert with instead of the empty "
                                                          "prompt: .txt (one line per image, sorted file-name order), "
                                                          ".jsonl ({\"file\": NAME, \"caption\": TEXT} lines) or .csv "
                                                          "(file,caption columns).")] = None,
    n_steps: IncSteps = 28,
    limit: Annotated[int, typer.Option(help="Invert only the first N images (0 = all; rerun with a larger N to add "
                                            "more).")] = 0,
    shard_size: Annotated[int, typer.Option(help="Images per safetensors shard (the unit of resume).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Images inverted at once.")] = 4,
    max_iter: Annotated[int, typer.Option(help="Fixed-point iterations per step (at most).")] = 30,
    tol: Annotated[float, typer.Option(help="Fixed-point tolerance (max-abs residual, latent units).")] = 1e-4,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Inverse noise correction, step 1: VAE-encode real images and invert the latents through the base's
    deterministic Euler sampler into latent noises (shards in --out; rerun to resume). Unconditional in the prompt:
    inverted with the empty prompt (or --captions) at guidance 1."""
    from .flow_inc import InvertConfig, invert_images

    _flow_model(model)
    dev = opts.device_option(device)
    if not images.exists():
        raise typer.BadParameter(f"{images} does not exist", param_hint="IMAGES")
    cfg = InvertConfig(steps=n_steps, limit=limit, shard_size=shard_size, batch_size=batch_size, max_iter=max_iter,
                       tol=tol)
    r = invert_images(model, images, out, cfg, captions=captions, show_progress=not quiet, device=dev)
    typer.echo(f"{r.n_images} latent noises in {r.shards} shards under {out} ({r.shards_computed} computed now); "
               f"worst fixed-point residual {r.max_residual:.2e}; reconstruction |Phi(noise) - latent|: mean of "
               f"per-image max {r.recon_mean_abs:.2e}, max {r.recon_max_abs:.2e}")


@app.command("correct")
@opts.run_errors
def correct_cmd(
    invert_dir: Annotated[Path, typer.Argument(help="A `pgraft t2i invert` directory.", show_default=False)],
    out: opts.Out = Path("runs/t2i/correct"),
    preset: Annotated[str, typer.Option(help="Corrector size (a diffusers UNet2DModel at latent resolution): tiny "
                                             "(tests), small (~11M parameters on SD3's 16x128x128 latents) or "
                                             "base (~63M).")] = "small",
    train_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch_size: opts.BatchSize = 16,
    lr: opts.LR = 5e-4,
    coupling: Annotated[str, typer.Option(help="Noise/target pairing: ot (minibatch optimal transport: near-straight "
                                               "paths, few --noise-steps) or independent.")] = "ot",
    seed: opts.Seed = 0,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Inverse noise correction, step 2: train a small flow N(0, I) -> law of the inverted latent noises
    (resumes in --out). Unconditional in the prompt: the corrector sees no text."""
    from pgraft.core.noise_correction import train_correction

    from .flow_inc import NOISE_MODELS, correction_config, correction_report

    dev = opts.device_option(device)
    if not invert_dir.is_dir():
        raise typer.BadParameter(f"{invert_dir} does not exist", param_hint="INVERT_DIR")
    cfg = correction_config(preset=preset, steps=train_steps, batch_size=batch_size, lr=lr, coupling=coupling, seed=seed)
    correction = train_correction(invert_dir, out, cfg, NOISE_MODELS, show_progress=not quiet, device=dev)
    r = correction_report(correction.meta)
    typer.echo(f"noise corrector ({r.parameters:,} parameters, {100 * r.relative_size:.3g}% of the transformer's "
               f"{r.transformer_parameters:,}) trained on {r.n_noises} inverted noises, saved to {out}")


@app.command("sample-corrected")
@opts.run_errors
def sample_corrected_cmd(
    noise_model: Annotated[Path, typer.Option("--noise-model", help="A `pgraft t2i correct` directory.",
                                              show_default=False)],
    model: Annotated[Optional[Path], typer.Option(
        "--model", help="The flow pipeline to sample (default: the one the noises were inverted through).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", help="Prompt, repeatable (default: the empty prompt, the setting the noises were inverted "
                         "in).")] = None,
    per_prompt: PerPrompt = 4,
    n_steps: Annotated[Optional[int], typer.Option("--n-steps", "--steps", help="Base Euler steps (default: the "
                                                                               "inverted count, which the corrector "
                                                                               "targets).")] = None,
    noise_steps: Annotated[int, typer.Option(help="Corrector Euler steps (0 = the base alone).")] = 4,
    guidance: Guidance = None,
    batch_size: Annotated[int, typer.Option(help="Images per sampler call.", callback=opts.at_least(1))] = 8,
    out: Annotated[Optional[Path], typer.Option(help="Folder for grid.png, images.safetensors and flops.json "
                                                     "(default NOISE_MODEL/samples).")] = None,
    seed: opts.Seed = 0,
    device: opts.Device = "auto",
    quiet: opts.Quiet = False,
) -> None:
    """Inverse noise correction, step 3: z ~ N(0, I) -> corrector -> frozen base (Euler, classifier-free guidance
    on --prompt) -> VAE decode; reports FLOPs per image of the base alone and corrected. The correction is
    unconditional in the prompt (inverted with the empty prompt or captions at guidance 1): with another prompt or
    guidance it is applied as is, untested."""
    from pgraft.core.checkpoint import save_json
    from pgraft.core.errors import UsageError
    from pgraft.core.noise_correction import load_correction
    from pgraft.core.state import save_state

    from .flow_inc import NOISE_MODELS, load_flow_pipeline, sample_corrected
    from .train import save_grid

    dev = opts.device_option(device)
    if n_steps is not None and n_steps < 1:
        raise typer.BadParameter(f"must be at least 1, got {n_steps}", param_hint="--n-steps")
    if noise_steps < 0:
        raise typer.BadParameter(f"must be at least 0, got {noise_steps}", param_hint="--noise-steps")
    with opts.bad_parameter(UsageError, param_hint="--noise-model"):
        correction = load_correction(noise_model, NOISE_MODELS)
    model = _flow_model(model if model is not None else Path(correction.meta["model"]))
    pipe = load_flow_pipeline(model, guidance)
    if list(pipe.state_shape) != list(correction.meta["latent_shape"]):
        raise typer.BadParameter(f"{model} samples latents {list(pipe.state_shape)}, the corrector was trained on "
                                 f"{correction.meta['latent_shape']}", param_hint="--model")
    steps = correction.base_steps if n_steps is None else n_steps
    prompts = [p for p in (prompt or [""]) for _ in range(per_prompt)]
    result = sample_corrected(pipe, correction.noise_model, prompts, steps, noise_steps, seed=seed,
                              batch_size=batch_size, show_progress=not quiet, device=dev)
    out = out or noise_model / "samples"
    save_grid(result.images, out / "grid.png", prompts, ncol=per_prompt)
    save_state(result.images, out / "images.safetensors")
    flops = result.flops.as_dict()
    save_json({**flops, "steps": steps, "noise_steps": noise_steps, "inverted_steps": correction.base_steps,
               "guidance_scale": pipe.info.guidance_scale}, out / "flops.json")
    note = "" if steps == correction.base_steps else (f"; note: inverted through {correction.base_steps} steps, "
                                                      f"sampled with {steps}")
    typer.echo(f"{len(prompts)} images written to {out}; FLOPs/image: base {flops['base'] / 1e9:.4g} G "
               f"({flops['base_calls']} transformer calls), corrected {flops['corrected'] / 1e9:.4g} G "
               f"(x{flops['ratio']:.3f}, corrector {flops['noise'] / 1e9:.4g} G in {flops['noise_calls']} calls)"
               f"{note}")
