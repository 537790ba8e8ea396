"""Text-to-image app: pretrain the embedded world's base model, build the GRAFT / P-GRAFT problem
over a prompt set, fine-tune with the core round loop, sample and evaluate.

One code path serves both faces of the app: a :class:`~.model.T2IPipeline` is either the embedded
world's pixel-space model or a local Stable Diffusion checkpoint (``--model PATH``); conditions
are prompts, a round draws ``groups`` prompts x ``M`` images, GRS acts inside each prompt's group,
and the sampler is DDIM(eta) on the core VP clock with classifier-free guidance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pgraft.core.app import App
from pgraft.core.losses import eps_matching_loss
from pgraft.core.pretrain import PretrainConfig, infinite_batches, pretrain
from pgraft.core.rewards import call_reward, finite_scores
from pgraft.core.sampling import ddim_log_prob, ddim_step
from pgraft.core.schedules import cosine_alpha_bar, vp_times
from pgraft.core.trainer import (
    GraftConfig,
    GraftProblem,
    RoundResult,
    Scores,
    is_main_process,
    run_graft,
    sample_finetuned,
)

from .checker import accuracy_table, check
from .flow_pipeline import (
    TRANSFORMER_ATTENTION,  # noqa: F401 (the flow LoRA targets: re-exported)
    FlowDenoiser,
    FlowT2IPipeline,
    export_flow_lora,
    flow_lacks,
    flow_log_prob,
    load_flow_lora_head,
    make_flow_problem,
    pipeline_kind,
    precision_dtype,
)
from .model import (
    PGRAFT_JSON,
    PRESETS,
    UNET_ATTENTION,
    Denoiser,
    PromptBatch,
    PromptEncoder,
    T2IPipeline,
    build_world_pipeline,
    diffusers_lora_state,
    fused_lora_copy,
    text_encoder_config,
    tokenize,
    unet_config,
)
from .pipelines import FAMILIES
from .presets import MODEL_NOTE, PRETRAIN_STEPS, SHIPPED_BASE, resolve_model  # noqa: F401 (PRETRAIN_STEPS: API)
from .prompts import load_prompts
from .rewards import make_reward
from .world import all_prompts, parse_prompt, render_dataset, to_float, to_uint8


# ----------------------------------------------------------------------------- pretraining
# Default step budgets: "default" measured at 0.63 s per batch-32 step with OMP_NUM_THREADS=1 on a
# shared 2-core machine (300 steps in 189 s), so 3600 steps take ~38 min (+ ~1 min rendering and
# checkpoints), inside the 45-minute budget.
@dataclass(frozen=True)
class PretrainT2IConfig:
    """Base-model pretraining on renders of ``prompts`` (the world's training split by default).

    ``cond_dropout``: fraction of captions replaced by "" so the same network also learns the
    unconditional eps needed by classifier-free guidance. ``prediction_type``: see
    :class:`~.model.Denoiser` (v-prediction keeps the black background of the world at abar(1) ~ 0,
    where an eps-model's samples drift to tinted, grid-patterned backgrounds)."""

    preset: str = "default"
    prompts: str = "train"
    steps: int = 3600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    n_images: int = 30000
    cond_dropout: float = 0.1
    guidance_scale: float = 2.0
    prediction_type: str = "v_prediction"
    seed: int = 0


class WorldModel(nn.Module):
    """UNet denoiser + text encoder trained jointly (only during pretraining)."""

    def __init__(self, unet: dict[str, Any], text_encoder: dict[str, Any], guidance_scale: float = 2.0,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.denoiser = Denoiser(unet, guidance_scale=guidance_scale, prediction_type=prediction_type,
                                 alpha_bar=cosine_alpha_bar)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder))


def pretrain_world(cfg: PretrainT2IConfig, out: str | Path, show_progress: bool = True) -> T2IPipeline:
    """Train the embedded world's base model; writes the pipeline directory ``out`` (diffusers
    layout, see :mod:`.model`) and the resumable training state in ``out/pretrain``."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[cfg.preset]
    out = Path(out)
    prompts = load_prompts(cfg.prompts).prompts
    # the tokenizer sees every grammar word (held-out prompts recombine training words)
    pipe = build_world_pipeline(cfg.preset, [s.text() for s in all_prompts()], out / "pretrain" / "tokenizer",
                                cfg.seed, cfg.guidance_scale, cfg.prediction_type)
    model_config = {"unet": unet_config(p), "text_encoder": text_encoder_config(p, len(pipe.tokenizer)),
                    "guidance_scale": cfg.guidance_scale, "prediction_type": cfg.prediction_type}
    torch.manual_seed(cfg.seed)  # model init (core.pretrain seeds only after the model exists)
    model = WorldModel(**model_config)
    # kept as uint8 (4x smaller than float) and converted per batch
    images, captions = render_dataset(prompts, cfg.n_images, p.image_size, cfg.seed)
    caption_ids = torch.arange(len(captions))
    tokenizer, max_length = pipe.tokenizer, p.max_length

    def loss_fn(m: WorldModel, images_u8: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x0 = pipe.encode_images(to_float(images_u8))
        drop = torch.rand(len(ids), generator=gen) < cfg.cond_dropout
        texts = ["" if d else captions[i] for i, d in zip(ids.tolist(), drop.tolist())]
        emb = m.text_encoder(tokenize(tokenizer, texts, max_length)).last_hidden_state
        eps = lambda x, s, c: m.denoiser(x, s, c, guidance_scale=1.0)  # noqa: E731
        return eps_matching_loss(eps, x0, 0.0, cosine_alpha_bar, PromptBatch(texts, emb), gen,
                                 m.denoiser.loss_weighting)

    pcfg = PretrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, ema=cfg.ema, seed=cfg.seed,
                          log_every=50, ckpt_every=500)
    (out / "pretrain").mkdir(parents=True, exist_ok=True)
    (out / "pretrain" / "t2i_pretrain.json").write_text(json.dumps(asdict(cfg), indent=2))
    ema = pretrain(model, infinite_batches(images, cfg.batch_size, cfg.seed, caption_ids), loss_fn, pcfg,
                   out / "pretrain", model_config, show_progress=show_progress)
    pipe.denoiser = ema.denoiser.eval()
    pipe.text_encoder = ema.text_encoder.eval()
    pipe.info.extra = {"pretrain": asdict(cfg)}
    pipe.save(out)
    return T2IPipeline.load(out)


# ----------------------------------------------------------------------------- the GRAFT problem
@dataclass(frozen=True)
class T2IConfig:
    """The app side of a fine-tuning run (the round loop's settings live in GraftConfig)."""

    model: str = "runs/t2i/base"
    prompts: str = "train"
    reward: str = "vqa"
    reward_weights: str | None = "runs/t2i/scorer"
    n_steps: int = 20
    eta: float | None = None  # None: the pipeline's default sampler (default_eta)
    guidance_scale: float | None = None
    cond_dropout: float = 0.0
    grid_images: int = 16
    reward_norm: str = "raw"  # how a weighted --reward combines its components: raw or zscore (.reward_spec)
    reward_nonfinite: float | None = None  # None: a non-finite score stops the run (core.rewards); else its value
    precision: str = "fp32"  # frozen parts in fp32 / bf16 / fp16 (flow pipelines); LoRA and optimizer stay fp32
    gradient_checkpointing: bool = False  # the transformer's enable_gradient_checkpointing while training
    image_size: int | None = None  # flow pipelines: the resolution sampled (None: the family's default)

    def record(self) -> dict[str, Any]:
        """The config as a run's config.json keeps it: ``reward_norm`` only when not ``raw``,
        ``reward_nonfinite`` / ``image_size`` only when set, ``precision`` only when not fp32 and
        ``gradient_checkpointing`` only when on, so runs written before they existed still ``--resume``
        (which refuses any difference)."""
        out = asdict(self)
        if out["reward_norm"] == "raw":
            del out["reward_norm"]
        for key, default in (("reward_nonfinite", None), ("precision", "fp32"), ("gradient_checkpointing", False),
                             ("image_size", None)):
            if out[key] == default:
                del out[key]
        return out


def default_eta(pipe) -> float:
    """The sampler noise ``eta = None`` stands for: DDIM eta 1 (DDPM-like) for UNet pipelines, 0
    (deterministic Euler, diffusers' sampler) for flow-matching ones, where eta is Flow-GRPO's SDE
    noise level."""
    return 0.0 if isinstance(pipe, FlowT2IPipeline) else 1.0


class T2IScorer:
    """How a t2i run scores its samples: :meth:`score` decodes a chunk once and returns the reward,
    plus the exact checker's verdicts as records and ``checker_acc`` when the prompts are in the
    shapes grammar; :meth:`on_round` saves an image grid of the round's first candidates. The core
    says which round it is (no counting of calls, so any number of processes agrees).
    """

    def __init__(self, pipe: T2IPipeline, reward, prompts: Sequence[str], grid_dir: Path | None = None,
                 grid_images: int = 16, name: str | None = None, nonfinite: float | None = None) -> None:
        self.pipe, self.reward, self.prompts = pipe, reward, list(prompts)
        self.grid_dir, self.grid_images = grid_dir, grid_images
        self.name, self.nonfinite = name or repr(reward), nonfinite  # the --reward typed; core.rewards' rule

    def score(self, x0: torch.Tensor, cond: PromptBatch) -> Scores:
        images = self.pipe.decode(x0)
        prompts = list(cond.prompts)
        # a weighted --reward (.reward_spec.CombinedReward) also reports each component's chunk mean,
        # and with a round-level --reward-norm its raw components (combined once the round is scored)
        chunk, components = getattr(self.reward, "chunk", None), None
        if chunk is not None:
            r, metrics, components = call_reward(chunk, self.name, images, prompts)
        else:
            r, metrics = call_reward(self.reward, self.name, images, prompts), {}
        r = finite_scores(r, self.name, self.nonfinite)  # one rule for every reward (core.rewards)
        records, metrics = pd.DataFrame({"prompt": prompts}), dict(metrics)
        if _in_grammar(prompts):
            correct = check(images, prompts)
            records["category"] = [parse_prompt(p).category for p in prompts]
            records["correct"] = correct.numpy()
            metrics["checker_acc"] = float(correct.float().mean())
        return Scores(r, None, records, metrics, components)

    def on_round(self, round_: int, result: RoundResult) -> None:
        if self.grid_dir is None:
            return
        n = min(self.grid_images, len(result.candidates.rewards))
        images = self.pipe.decode(result.candidates.x_0[:n])
        prompts = [self.prompts[i] for i in result.candidates.cond_index[:n].tolist()]
        save_grid(images, self.grid_dir / f"round_{round_:04d}.png", prompts)


def _in_grammar(prompts: Sequence[str]) -> bool:
    try:
        for p in set(prompts):
            parse_prompt(p)
    except ValueError:
        return False
    return True


def drop_conditions(cond: PromptBatch, p: float, generator: torch.Generator | None) -> PromptBatch:
    """``cond`` with each prompt replaced by the empty prompt with probability ``p`` (its
    embedding by ``cond.uncond``), as in classifier-free-guidance training."""
    if p <= 0:
        return cond
    if cond.uncond is None:
        raise ValueError("condition dropout needs the empty prompt's embedding (guidance on)")
    drop = torch.rand(len(cond), generator=generator) < p
    embeds = torch.where(drop.view(-1, 1, 1).to(cond.embeds.device), cond.uncond.expand_as(cond.embeds), cond.embeds)
    pooled = cond.pooled
    if pooled is not None:  # flow (SD3) batches: the pooled embedding is dropped with its prompt
        pooled = torch.where(drop.view(-1, 1).to(pooled.device), cond.uncond_pooled.expand_as(pooled), pooled)
    return PromptBatch(["" if d else q for q, d in zip(cond.prompts, drop.tolist())], embeds, cond.uncond,
                       pooled, cond.uncond_pooled)


def make_problem(pipe: T2IPipeline, prompts: Sequence[str], reward, n_steps: int, eta: float | None,
                 encoder: PromptEncoder | None = None, cond_dropout: float = 0.0,
                 scorer: "T2IScorer | None" = None) -> GraftProblem:
    """The text-to-image :class:`GraftProblem`: prior N(0, I) on the state shape, DDIM(eta) on
    ``vp_times(n_steps)`` with the pipeline's abar (x0_hat clipped in pixel space), the P-GRAFT eps loss on the conditional eps
    (guidance 1), ``reward(decode(x0), prompts)``, conditions = ``prompts``.

    ``cond_dropout`` > 0 (with guidance on) also trains the unconditional eps on the accepted
    samples, as pretraining did; otherwise only the conditional branch is fitted and the guided
    difference eps_c - eps_u is left to drift.

    A flow-matching pipeline (:class:`~.flow_pipeline.FlowT2IPipeline`) gets its own problem
    (:func:`~.flow_pipeline.make_flow_problem`: the scheduler's sigma grid, Euler / Flow-GRPO SDE
    step with noise level ``eta``, the linear-flow loss). ``eta = None``: :func:`default_eta`."""
    eta = default_eta(pipe) if eta is None else float(eta)
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
    if isinstance(pipe, FlowT2IPipeline):
        if cond_dropout > 0 and pipe.denoiser.guidance_scale == 1.0:
            raise ValueError("cond_dropout needs classifier-free guidance (guidance scale != 1)")
        drop = (lambda c, g: drop_conditions(c, cond_dropout, g)) if cond_dropout > 0 else None
        return make_flow_problem(pipe, prompts, reward, n_steps, eta, encoder, drop, scorer)
    encoder = encoder or pipe.prompt_encoder()
    guided = pipe.denoiser.guidance_scale != 1.0
    shape = pipe.state_shape
    alpha_bar = pipe.alpha_bar
    weighting = pipe.denoiser.loss_weighting
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
    if cond_dropout > 0 and not guided:
        raise ValueError("cond_dropout needs classifier-free guidance (guidance scale != 1)")

    def loss(model, x, t, cond, gen):
        eps = lambda x_s, s, c: model(x_s, s, c, guidance_scale=1.0)  # noqa: E731
        return eps_matching_loss(eps, x, t, alpha_bar, drop_conditions(cond, cond_dropout, gen), gen, weighting)

    return GraftProblem(
        prior=lambda n, g: torch.randn(n, *shape, generator=g),
        times=vp_times(n_steps),
        step=ddim_step(alpha_bar, eta, clip=pipe.clip_sample),
        loss=loss,
        reward=reward,
        conditions=list(prompts),
        collate=lambda items: encoder(items, guidance=guided),
        score=None if scorer is None else scorer.score,
        on_round=None if scorer is None else scorer.on_round,
    )


def load_pipeline(path: str | Path, guidance_scale: float | None = None, precision: str = "fp32",
                  image_size: int | None = None) -> T2IPipeline | FlowT2IPipeline:
    """The pipeline ``path`` names (a directory, ``shipped``, or a hub id in the local Hugging Face cache:
    :func:`~.presets.resolve_model`): a flow-matching family's directory (SD3, FLUX.1, Qwen-Image, SANA,
    from model_index.json's ``_class_name``, :func:`~.flow_pipeline.pipeline_kind`) as a
    :class:`~.flow_pipeline.FlowT2IPipeline` with its frozen parts in ``precision``, a UNet Stable
    Diffusion or embedded-world directory as a :class:`~.model.T2IPipeline` (fp32 only)."""
    dtype = precision_dtype(precision)
    path = resolve_model(path)
    kind = pipeline_kind(path) if Path(path).is_dir() else "sd"
    if kind in FAMILIES:
        return FlowT2IPipeline.load(path, guidance_scale, dtype=dtype, image_size=image_size)
    if precision != "fp32":
        raise ValueError(f"precision {precision} is for flow-matching pipelines ({', '.join(FAMILIES)}); "
                         f"{path} is a UNet pipeline: use fp32")
    if image_size is not None:
        raise ValueError(f"image_size is for flow-matching pipelines; {path} is a UNet pipeline with a fixed size")
    return T2IPipeline.load(path, guidance_scale)


def _pipeline_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a pipeline :func:`load_pipeline` reads (None when it is
    one), the t2i contract's check (``APP.lacks``): unet/, text_encoder/, tokenizer/, and either
    pgraft.json (the embedded world) or vae/ + scheduler/ (Stable Diffusion); a flow family's own parts."""
    directory = Path(directory)
    try:
        if pipeline_kind(directory) in FAMILIES:  # any flow family (pipeline_kind refuses one lacking a part)
            return flow_lacks(directory)
    except ValueError as err:  # a flow-matching pipeline of an unsupported class
        return str(err)
    for part in ("unet", "text_encoder", "tokenizer"):
        if not (directory / part).is_dir():
            return f"no {part}/"
    if not (directory / PGRAFT_JSON).is_file():
        for part in ("vae", "scheduler"):
            if not (directory / part).is_dir():
                return f"neither {PGRAFT_JSON} nor {part}/"
    return None


# the t2i contract (:mod:`pgraft.core.app`): a base is a pipeline directory, never pretrained on its own
APP = App(
    name="t2i",
    shipped=SHIPPED_BASE,
    load=load_pipeline,
    check=_pipeline_lacks,
    checkpoint=False,
    pretrain_note=MODEL_NOTE,
    shipped_preset=None,
    flag="--model",
    resolve=resolve_model,
    make_problem=make_problem,
    presets=PRESETS,
)


def prepare_flow_training(pipe: FlowT2IPipeline, prompts: Sequence[str], gradient_checkpointing: bool) -> None:
    """Memory for a flow run: every prompt of the run (and the negative one) embedded once, then the text
    encoders moved off the accelerator; the transformer's gradient checkpointing when asked (the
    fine-tuned head is a copy of the base, so it inherits it)."""
    encoder = pipe.prompt_encoder()
    encoder.precompute(prompts, guidance=pipe.denoiser.guidance_scale != 1.0)
    encoder.release()
    if gradient_checkpointing:
        pipe.denoiser.transformer.enable_gradient_checkpointing()


def recorded_problem(pipe: T2IPipeline, app: T2IConfig, prompts: Sequence[str], out: Path) -> GraftProblem:
    """:func:`make_problem` scored by a :class:`T2IScorer` of ``app.reward`` (checker verdicts in
    the store and metrics, a grid per round in ``out/grids``)."""
    reward = make_reward(app.reward, app.reward_weights, norm=app.reward_norm, nonfinite=app.reward_nonfinite)
    scorer = T2IScorer(pipe, reward, prompts, out / "grids", app.grid_images, name=app.reward,
                       nonfinite=app.reward_nonfinite)
    problem = make_problem(pipe, prompts, None, app.n_steps, app.eta, cond_dropout=app.cond_dropout, scorer=scorer)
    problem.combine = getattr(reward, "round_combine", None)  # --reward-norm zscore-round / rank
    return problem


def train_t2i(app: T2IConfig, cfg: GraftConfig, out: str | Path, resume: bool = False,
              show_progress: bool = True) -> tuple[nn.Module, pd.DataFrame]:
    """GRAFT / P-GRAFT over ``app.prompts`` with the core round loop; LoRA on the UNet attention
    by default. Writes the core run directory plus ``grids/round_*.png`` and, with LoRA,
    ``lora/`` (diffusers ``save_lora_weights`` format)."""

    out = Path(out)
    pipe = load_pipeline(app.model, app.guidance_scale, app.precision, app.image_size)
    app = replace(app, eta=default_eta(pipe) if app.eta is None else app.eta)  # the run records the sampler used
    prompts = load_prompts(app.prompts).prompts
    flow = isinstance(pipe, FlowT2IPipeline)
    if cfg.lora_rank > 0 and not cfg.lora_targets:
        cfg = replace(cfg, lora_targets=pipe.family.lora_targets if flow else UNET_ATTENTION)
    if flow:
        prepare_flow_training(pipe, prompts, app.gradient_checkpointing)
    elif app.gradient_checkpointing:
        pipe.denoiser.unet.enable_gradient_checkpointing()
    problem = recorded_problem(pipe, app, prompts, out)
    head, table = run_graft(problem, pipe.denoiser, pipe.denoiser.init_kwargs(), cfg, out,
                            app_config={"t2i": app.record()}, resume=resume, show_progress=show_progress)
    if flow:  # diffusers formats: the transformer LoRA, and the merged head as a pipeline directory
        if cfg.lora_rank > 0:
            from pgraft.core.rundir import RunDir

            _, weights, _ = RunDir(out, resume=True, report=is_main_process()).load_checkpoint()
            export_flow_lora(weights, out / "lora", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, pipe.kind)
        pipe.save(out / "pipeline", head)
    elif cfg.lora_rank > 0:
        export_lora(out, out / "lora", cfg)
    return head, table


# ----------------------------------------------------------------------------- LoRA export / reload
def lora_state_from_checkpoint(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys of a LoRA-wrapped :class:`Denoiser` -> diffusers UNet LoRA keys (:func:`~.model.diffusers_lora_state`)."""
    return diffusers_lora_state(weights, "unet")


def export_lora(run_dir: str | Path, directory: str | Path, cfg: GraftConfig) -> Path:
    """Write the last round's UNet LoRA with diffusers' ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    from pgraft.core.rundir import RunDir

    _, weights, _ = RunDir(run_dir, resume=True, report=is_main_process()).load_checkpoint()
    state = lora_state_from_checkpoint(weights)
    meta = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
            "target_modules": list(cfg.lora_targets or UNET_ATTENTION)}
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    return Path(directory)


def load_lora_head(base: Denoiser, lora_dir: str | Path) -> Denoiser:
    """A copy of ``base`` with the LoRA in ``lora_dir`` (diffusers format) loaded and fused."""
    return fused_lora_copy(base, lora_dir, "unet")


def load_head(run_dir: str | Path, base: Denoiser) -> Denoiser:
    """The fine-tuned head of a ``pgraft t2i train`` run: its diffusers LoRA if present, else the
    merged ``head/`` save_pretrained directory."""
    from pgraft.core.checkpoint import load_run_head

    run_dir = Path(run_dir)
    if isinstance(base, FlowDenoiser):
        if (run_dir / "lora").is_dir():
            return load_flow_lora_head(base, run_dir / "lora")
        if (run_dir / "head").is_dir():
            head = load_run_head(FlowDenoiser, run_dir)
            head.guidance_scale = base.guidance_scale
            return head.to(next(base.parameters()).dtype).eval()
        raise FileNotFoundError(f"{run_dir} holds neither lora/ nor head/: is it a finished `pgraft t2i train` run?")
    if (run_dir / "lora").is_dir():
        return load_lora_head(base, run_dir / "lora")
    if (run_dir / "head").is_dir():
        head = load_run_head(Denoiser, run_dir)
        head.guidance_scale, head.alpha_bar = base.guidance_scale, base.alpha_bar
        return head.eval()
    raise FileNotFoundError(f"{run_dir} holds neither lora/ nor head/: is it a finished `pgraft t2i train` run?")


# ----------------------------------------------------------------------------- sampling / evaluation
def sample_images(pipe: T2IPipeline, head: nn.Module, prompts: Sequence[str], per_prompt: int, split: float,
                  n_steps: int, eta: float | None, seed: int = 0, batch: int = 64,
                  show_progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``per_prompt`` images for each prompt with head T -> t and base t -> 0; images [N, 3, H, W]."""
    problem = make_problem(pipe, prompts, None, n_steps, eta)
    cond_index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    _, x0 = sample_finetuned(problem, head, pipe.denoiser, len(cond_index), split, seed, batch, cond_index,
                             show_progress)
    images = torch.cat([pipe.decode(x0[i:i + batch]) for i in range(0, len(x0), batch)])
    return images, [prompts[i] for i in cond_index.tolist()]


def evaluate_images(images: torch.Tensor, prompts: Sequence[str], rewards: dict[str, Any],
                    name: str = "") -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per-sample table (prompt, each reward, checker verdict) and the GenEval-style accuracy row
    (None when the prompts are outside the world grammar)."""
    df = pd.DataFrame({"prompt": list(prompts)})
    for key, fn in rewards.items():
        df[key] = torch.as_tensor(fn(images, list(prompts))).double().numpy()
    table = None
    if _in_grammar(prompts):
        correct = check(images, list(prompts))
        df["category"] = [parse_prompt(p).category for p in prompts]
        df["correct"] = correct.numpy()
        table = accuracy_table(list(prompts), correct, name)
        for key in rewards:
            table[f"mean_{key}"] = df[key].mean()
    return df, table


def save_grid(images: torch.Tensor, path: str | Path, prompts: Sequence[str] | None = None, ncol: int = 8,
              scale: int = 4) -> Path:
    """Save images [N, 3, H, W] in [-1, 1] as one PNG grid (nearest-neighbour upscaled); prompts,
    if given, go to a ``.txt`` next to it in grid order."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, _, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, 3), 128, dtype=np.uint8)
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = arr[i]
    img = Image.fromarray(canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    if prompts is not None:
        path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
    return path


# ----------------------------------------------------------------------------- policy-gradient baseline
def log_prob(pipe: T2IPipeline, eta: float | None):
    """Per-step log p_theta(x_next | x) [B] of the sampler :func:`make_problem` builds for ``pipe``
    (DDIM(``eta``), x0_hat clipped to ``pipe.clip_sample``), for the DDPO-style baseline.

    The policy is called exactly as in sampling, ``model(x, t, cond)`` with the problem's
    :class:`~.model.PromptBatch` (which carries ``uncond`` when guidance is on), so the density
    is that of the classifier-free-guided step the samples were drawn from. A flow-matching pipeline's
    is the Gaussian density of Flow-GRPO's SDE step with noise level ``eta``
    (:func:`~.flow_pipeline.flow_log_prob`); ``eta = None``: :func:`default_eta`."""
    eta = default_eta(pipe) if eta is None else float(eta)
    if isinstance(pipe, FlowT2IPipeline):
        return flow_log_prob(eta)
    return ddim_log_prob(pipe.alpha_bar, eta, clip=pipe.clip_sample)


# ----------------------------------------------------------------------------- policy gradient, any family
# |rho - 1| allowed at the first inner step of a round (no update yet, so rho = 1 but for numerics: the
# per-dimension ratio of the same step's density recomputed on another minibatch), per --precision
RATIO_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}
# Flow-GRPO's SDE noise level when eta is not given (the policy gradient needs a stochastic step)
PG_FLOW_ETA = 0.7


def check_first_ratio(row: dict[str, Any], precision: str) -> float:
    """The round's ``first_ratio_error`` (max |rho - 1| at the first inner step, logged by the core's
    policy-gradient loop), refused when above :data:`RATIO_TOLERANCE` of ``precision``: old and new
    log-densities then disagree by more than rounding, i.e. sampling and training do not compute the
    same policy (a dtype or mode mismatch)."""
    error = float(row.get("first_ratio_error", 0.0))
    tolerance = RATIO_TOLERANCE[precision]
    if not error <= tolerance:
        raise FloatingPointError(f"round {row.get('round')}: first-step importance ratio off 1 by {error:.3g} > "
                                 f"{tolerance:g} allowed at {precision}")
    return error


def train_t2i_pg(app: T2IConfig, cfg, out: str | Path, resume: bool = False,
                 show_progress: bool = True) -> tuple[nn.Module, pd.DataFrame]:
    """The policy-gradient baseline (DDPO / Flow-GRPO, :func:`pgraft.core.policy_gradient.run_policy_gradient`)
    over ``app.prompts`` on any pipeline :func:`load_pipeline` reads, with ``app.precision`` and gradient
    checkpointing as :func:`train_t2i`; flow pipelines sample with Flow-GRPO's SDE step (``eta`` None:
    :data:`PG_FLOW_ETA`). Every round's first-step importance ratio is checked (:func:`check_first_ratio`)
    and reported as ``first_ratio_error`` in metrics.csv; with LoRA, ``lora/`` is written in diffusers format."""
    from pgraft.core.policy_gradient import run_policy_gradient

    out = Path(out)
    pipe = load_pipeline(app.model, app.guidance_scale, app.precision, app.image_size)
    flow = isinstance(pipe, FlowT2IPipeline)
    app = replace(app, eta=(PG_FLOW_ETA if flow else 1.0) if app.eta is None else app.eta)
    prompts = load_prompts(app.prompts).prompts
    if cfg.lora_rank > 0 and not cfg.lora_targets:
        cfg = replace(cfg, lora_targets=pipe.family.lora_targets if flow else UNET_ATTENTION)
    if flow:
        prepare_flow_training(pipe, prompts, app.gradient_checkpointing)
    problem = recorded_problem(pipe, app, prompts, out)
    on_round = problem.on_round

    def checked(round_: int, result: RoundResult) -> None:
        if result.phase == "train":
            error = check_first_ratio(result.row, app.precision)
            if show_progress and is_main_process():
                print(f"round {round_}: first-step |rho - 1| = {error:.2e} (<= {RATIO_TOLERANCE[app.precision]:g})")
        if on_round is not None:
            on_round(round_, result)

    problem = replace(problem, on_round=checked)
    head, table = run_policy_gradient(problem, log_prob(pipe, app.eta), pipe.denoiser, pipe.denoiser.init_kwargs(),
                                      cfg, out, app_config={"t2i": app.record()}, resume=resume,
                                      show_progress=show_progress)
    if cfg.lora_rank > 0 and flow:
        from pgraft.core.rundir import RunDir

        _, weights, _ = RunDir(out, resume=True, report=is_main_process()).load_checkpoint()
        export_flow_lora(weights, out / "lora", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, pipe.kind)
    return head, table


# ----------------------------------------------------------------------------- DiffusionNFT, flow families
NFT_FAMILIES_ONLY = "NFT here trains flow-matching transformers (SD3, FLUX, Qwen-Image, SANA)"


def flow_velocity(model: nn.Module, x_s: torch.Tensor, s: torch.Tensor, cond: PromptBatch) -> torch.Tensor:
    """The conditional velocity v(x_s, s | prompt) (guidance 1) a flow head is trained on: the
    :data:`pgraft.core.nft.Predict` of :func:`train_t2i_nft`, as the flow problem's own loss calls it."""
    return model(x_s, s, cond, guidance_scale=1.0)


def train_t2i_nft(app: T2IConfig, cfg, out: str | Path, resume: bool = False,
                  show_progress: bool = True) -> tuple[nn.Module, pd.DataFrame]:
    """DiffusionNFT (:func:`pgraft.core.nft.run_nft`, ``cfg`` an :class:`~pgraft.core.nft.NFTConfig`) over
    ``app.prompts`` on a flow-matching pipeline (SD3, FLUX.1, Qwen-Image, SANA; a UNet pipeline is refused):
    rounds sampled with the app's sampler (any ``eta``, default the Euler ODE; ``app.guidance_scale``, 1
    for DiffusionNFT's CFG-free setting), the policy trained on the rectified flow the family was trained
    on (:class:`~pgraft.core.bridges.LinearFlowPath`, x_s = (1 - s) x_0 + s eps, target eps - x_0) with its
    conditional velocity (:func:`flow_velocity`). LoRA on the family's attention by default targets when
    ``cfg.lora_rank`` > 0, written to ``lora/`` in diffusers format as :func:`train_t2i` does; precision and
    gradient checkpointing as :func:`train_t2i`. Refused in one line: a UNet pipeline, ``cond_dropout``."""
    from pgraft.core.bridges import LinearFlowPath
    from pgraft.core.errors import UsageError
    from pgraft.core.nft import run_nft

    from .flow_pipeline import is_flow_directory

    out = Path(out)
    path = resolve_model(app.model)
    if Path(path).is_dir() and not is_flow_directory(path):  # refused before its weights are read
        raise UsageError(f"{app.model} is a UNet pipeline: {NFT_FAMILIES_ONLY}")
    if app.cond_dropout > 0:
        raise UsageError(f"cond_dropout {app.cond_dropout}: NFT trains the conditional velocity only; use 0")
    pipe = load_pipeline(app.model, app.guidance_scale, app.precision, app.image_size)
    if not isinstance(pipe, FlowT2IPipeline):
        raise UsageError(f"{app.model} is a UNet pipeline: {NFT_FAMILIES_ONLY}")
    app = replace(app, eta=default_eta(pipe) if app.eta is None else app.eta)  # the run records the sampler used
    prompts = load_prompts(app.prompts).prompts
    if cfg.lora_rank > 0 and not cfg.lora_targets:
        cfg = replace(cfg, lora_targets=pipe.family.lora_targets)
    prepare_flow_training(pipe, prompts, app.gradient_checkpointing)
    problem = recorded_problem(pipe, app, prompts, out)
    head, table = run_nft(problem, LinearFlowPath(), pipe.denoiser, pipe.denoiser.init_kwargs(), cfg, out,
                          app_config={"t2i": app.record()}, show_progress=show_progress, resume=resume,
                          predict=flow_velocity)
    if cfg.lora_rank > 0:
        from pgraft.core.rundir import RunDir

        _, weights, _ = RunDir(out, resume=True, report=is_main_process()).load_checkpoint()
        export_flow_lora(weights, out / "lora", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, pipe.kind)
    return head, table
