"""Flow-matching text-to-image pipelines (the Stable Diffusion 3 / 3.5 family) behind the same
app interface as :class:`~.model.T2IPipeline`: ``pgraft t2i train|sample|evaluate --model DIR``
read a diffusers ``StableDiffusion3Pipeline`` directory (the kind is read from ``model_index.json``
and ``scheduler/scheduler_config.json``, see :func:`pipeline_kind`).

Time convention. diffusers' flow pipelines noise latents as x_sigma = (1 - sigma) x_0 + sigma eps
(``FlowMatchEulerDiscreteScheduler.scale_noise``), the transformer predicts v = eps - x_0 at
timestep ``1000 sigma`` and the scheduler steps x_{sigma'} = x_sigma + (sigma' - sigma) v on a
descending grid from sigma = 1 to 0, shifted by the scheduler's ``shift`` (sigma -> shift sigma /
(1 + (shift - 1) sigma)). That is the core's linear flow (:class:`pgraft.core.bridges.LinearFlowPath`,
clock 1 = noise, 0 = data) with core time t = sigma, so:

- the sampler's grid is the scheduler's own ``sigmas`` after ``set_timesteps(n_steps)`` (shift and,
  for dynamic shifting, the resolution's ``mu`` included), the final 0 appended;
- :class:`FlowDenoiser` maps (x, t, prompts) to v with classifier-free guidance, calling the
  transformer at timestep ``t * num_train_timesteps``;
- the step is the Euler step (``eta = 0``, diffusers' deterministic sampler) or Flow-GRPO's SDE
  step with noise level ``eta`` (:func:`pgraft.core.sampling.flow_sde_step`), whose Gaussian
  log-density (:func:`pgraft.core.sampling.flow_sde_log_prob`) is the policy-gradient baseline's;
- GRAFT / P-GRAFT fine-tune with the core's linear-flow loss
  (:func:`pgraft.core.losses.flow_matching_loss`, started at the split's sigma for P-GRAFT) on the
  conditional velocity (guidance 1).

Not supported (refused): inverted sigmas and the scheduler's ``stochastic_sampling``; other flow
pipelines (Flux packs latents into sequences with position ids and takes guidance as an input, so
it would need its own denoiser and prompt encoder).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgraft.core.losses import flow_matching_loss
from pgraft.core.sampling import flow_sde_log_prob, flow_sde_step
from pgraft.core.state import default_device
from pgraft.core.trainer import GraftProblem

from .model import PGRAFT_JSON, PromptBatch, diffusers_lora_state, fused_lora_copy

# model_index.json classes read as flow-matching pipelines (same components, same code)
FLOW_PIPELINES = ("StableDiffusion3Pipeline",)
# the components a StableDiffusion3Pipeline directory must have (text_encoder_3 / tokenizer_3, T5, are optional)
SD3_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# LoRA targets: the joint attention's image-stream projections (as UNET_ATTENTION for the UNet)
TRANSFORMER_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def local_device() -> torch.device:
    """Where the frozen encoders and the VAE live: :func:`~pgraft.core.state.default_device`, and under
    torchrun / accelerate this process's GPU (``LOCAL_RANK``), which the round loop's accelerator uses."""
    device = default_device()
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# ----------------------------------------------------------------------------- detection
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def pipeline_kind(directory: str | Path) -> str:
    """``"world"`` (pgraft.json), ``"sd3"`` (a flow-matching ``StableDiffusion3Pipeline``) or
    ``"sd"`` (anything else: read as a DDIM Stable Diffusion checkpoint), from the directory's
    ``model_index.json`` class and its scheduler's config class. A flow-matching pipeline of another
    class (e.g. ``FluxPipeline``) is refused with a ValueError naming it."""
    directory = Path(directory)
    if (directory / PGRAFT_JSON).is_file():
        return "world"
    cls = _read_json(directory / "model_index.json").get("_class_name")
    scheduler = _read_json(directory / "scheduler" / "scheduler_config.json").get("_class_name", "")
    if cls in FLOW_PIPELINES:
        return "sd3"
    if str(scheduler).startswith("FlowMatch") or (cls and cls.startswith("Flux")):
        raise ValueError(f"{directory} is a flow-matching pipeline ({cls or 'no model_index.json'}, scheduler "
                         f"{scheduler or '?'}); of those only {', '.join(FLOW_PIPELINES)} directories are supported")
    return "sd"


def is_flow_directory(directory: str | Path) -> bool:
    return Path(directory).is_dir() and pipeline_kind(directory) == "sd3"


def flow_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a loadable ``StableDiffusion3Pipeline`` (None: nothing)."""
    for part in SD3_PARTS:
        if not (Path(directory) / part).is_dir():
            return f"no {part}/ (a StableDiffusion3Pipeline directory has {', '.join(SD3_PARTS)})"
    return None


# ----------------------------------------------------------------------------- denoiser
class FlowDenoiser(nn.Module):
    """v_theta(x, t, cond) around an ``SD3Transformer2DModel`` (see the module docstring).

    x [B, C, h, w] latents, t [B] = sigma in [0, 1], cond a :class:`~.model.PromptBatch` with
    ``pooled`` set. With guidance scale w != 1 and ``cond.uncond`` set, returns v_u + w (v_c - v_u)
    (one transformer call on the doubled batch, unconditional half first, as diffusers); losses call
    it with ``guidance_scale=1``. Inputs are cast to the transformer's dtype, the output to x's.
    """

    def __init__(self, transformer: dict[str, Any], timestep_scale: float = 1000.0, guidance_scale: float = 7.0) -> None:
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.transformer = SD3Transformer2DModel.from_config(transformer)
        self.timestep_scale = float(timestep_scale)
        self.guidance_scale = float(guidance_scale)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, timestep_scale: float = 1000.0,
                         guidance_scale: float = 7.0) -> "FlowDenoiser":
        """Wrap an existing (pretrained) transformer without re-initialising it."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.transformer = transformer
        model.timestep_scale, model.guidance_scale = float(timestep_scale), float(guidance_scale)
        return model

    def init_kwargs(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild this module (core ``save_pretrained`` / ``load_pretrained``)."""
        config = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        return {"transformer": json.loads(json.dumps(config, default=str)),
                "timestep_scale": self.timestep_scale, "guidance_scale": self.guidance_scale}

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input for core times (sigmas) t: ``t * num_train_timesteps``."""
        return t.float() * self.timestep_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptBatch, guidance_scale: float | None = None) -> torch.Tensor:
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if cond.pooled is None:
            raise ValueError("a flow-matching (SD3) denoiser needs pooled prompt embeddings (cond.pooled)")
        dtype = next(self.transformer.parameters()).dtype
        ts = self.timesteps(t).to(x.device)
        emb, pooled = cond.embeds.to(x.device, dtype), cond.pooled.to(x.device, dtype)
        h = x.to(dtype)
        if w == 1.0 or cond.uncond is None:
            v = self.transformer(hidden_states=h, timestep=ts, encoder_hidden_states=emb,
                                 pooled_projections=pooled).sample
        else:
            unc = cond.uncond.to(x.device, dtype).expand_as(emb)
            unc_pooled = cond.uncond_pooled.to(x.device, dtype).expand_as(pooled)
            v_u, v_c = self.transformer(hidden_states=torch.cat([h, h]), timestep=torch.cat([ts, ts]),
                                        encoder_hidden_states=torch.cat([unc, emb]),
                                        pooled_projections=torch.cat([unc_pooled, pooled])).sample.chunk(2)
            v = v_u + w * (v_c - v_u)
        return v.to(x.dtype)


# ----------------------------------------------------------------------------- text side
class FlowPromptEncoder:
    """The pipeline's own ``encode_prompt`` (CLIP-L + CLIP-G, and T5 when the directory has it; T5
    absent gives diffusers' zero block) -> :class:`~.model.PromptBatch` with ``pooled`` set.
    Embeddings are memoised per prompt on the CPU (the encoders are frozen)."""

    def __init__(self, sd3, max_sequence_length: int = 256, device: str | torch.device | None = None) -> None:
        self.sd3 = sd3
        self.max_sequence_length = int(max_sequence_length)
        self.device = torch.device(device) if device is not None else local_device()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(sd3, name, None)
            if encoder is not None:
                encoder.to(self.device).eval().requires_grad_(False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], pooled_prompt_embeds [B, P]) of ``prompts``, on the CPU."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            embeds, _, pooled, _ = self.sd3.encode_prompt(
                prompt=missing, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            self._cache.update(zip(missing, zip(embeds.cpu(), pooled.cpu())))
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))

    def __call__(self, prompts: Sequence[str], guidance: bool = True) -> PromptBatch:
        prompts = list(prompts)
        embeds, pooled = self.embed(prompts)
        if not guidance:
            return PromptBatch(prompts, embeds, None, pooled, None)
        unc, unc_pooled = self.embed([""])  # diffusers' default negative prompt
        return PromptBatch(prompts, embeds, unc, pooled, unc_pooled)


# ----------------------------------------------------------------------------- pipeline
@dataclass
class FlowInfo:
    """Sampler settings of a flow pipeline (read from its scheduler and transformer configs)."""

    kind: str = "sd3"
    image_size: int = 1024
    guidance_scale: float = 7.0
    max_sequence_length: int = 256
    num_train_timesteps: int = 1000
    shift: float = 3.0
    mu: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FlowT2IPipeline:
    """A loaded ``StableDiffusion3Pipeline`` (``sd3``: encoders, tokenizers, VAE, scheduler) and its
    transformer as a :class:`FlowDenoiser`; same interface as :class:`~.model.T2IPipeline` where the
    app uses it (``denoiser``, ``state_shape``, ``prompt_encoder``, ``decode``, ``encode_images``)."""

    denoiser: FlowDenoiser
    sd3: Any
    state_shape: tuple[int, int, int]
    info: FlowInfo
    directory: Path | None = None
    kind: str = "sd3"
    _encoder: FlowPromptEncoder | None = None

    @property
    def vae(self) -> nn.Module:
        return self.sd3.vae

    @property
    def scheduler(self):
        return self.sd3.scheduler

    def times(self, n_steps: int) -> torch.Tensor:
        """The sampler's grid [n_steps + 1], float64, descending 1 -> 0: the scheduler's sigmas after
        ``set_timesteps(n_steps)`` (its shift applied), exactly the ones diffusers' pipeline steps on."""
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
        kwargs = {"mu": self.info.mu} if self.info.mu is not None else {}
        self.scheduler.set_timesteps(n_steps, device="cpu", **kwargs)
        return self.scheduler.sigmas.detach().cpu().double().clone()

    def prompt_encoder(self, device: str | torch.device | None = None) -> FlowPromptEncoder:
        """The pipeline's prompt encoder (one per pipeline, so its cache is shared)."""
        if self._encoder is None or (device is not None and torch.device(device) != self._encoder.device):
            self._encoder = FlowPromptEncoder(self.sd3, self.info.max_sequence_length, device)
        return self._encoder

    def _vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [-1, 1] on the CPU: vae.decode(x / scaling + shift)."""
        cfg = self.vae.config
        z = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        p = next(self.vae.parameters())
        return self.vae.decode(z.to(p.device, p.dtype)).sample.float().clamp(-1, 1).cpu()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (posterior mean - shift) * scaling, on the CPU."""
        cfg = self.vae.config
        p = next(self.vae.parameters())
        mean = self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mean.float().cpu()
        return (mean - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    @classmethod
    def load(cls, directory: str | Path, guidance_scale: float | None = None, dtype: torch.dtype = torch.float32,
             max_sequence_length: int = 256) -> "FlowT2IPipeline":
        """Read a ``StableDiffusion3Pipeline`` directory (``text_encoder_3`` may be absent: T5 off)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        lacks = flow_lacks(directory)
        if lacks is not None:
            raise ValueError(f"{directory} is not a StableDiffusion3Pipeline directory: {lacks}")
        extra = {} if (directory / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; `torch_dtype` works in every version
            warnings.simplefilter("ignore", FutureWarning)
            sd3 = StableDiffusion3Pipeline.from_pretrained(str(directory), torch_dtype=dtype, **extra)
        scheduler = sd3.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):  # read the flow-matching config as Euler's
            sd3.scheduler = scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if scheduler.config.get("invert_sigmas") or scheduler.config.get("stochastic_sampling"):
            raise ValueError(f"{directory}: schedulers with invert_sigmas / stochastic_sampling are not supported")
        transformer = sd3.transformer.eval().requires_grad_(False)
        sd3.vae.eval().requires_grad_(False).to(local_device())
        tcfg = transformer.config
        side = int(tcfg.sample_size)
        mu = None
        if scheduler.config.get("use_dynamic_shifting"):  # as StableDiffusion3Pipeline.__call__ at the default size
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            seq = (side // tcfg.patch_size) ** 2
            c = scheduler.config
            mu = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        info = FlowInfo(image_size=side * sd3.vae_scale_factor, max_sequence_length=int(max_sequence_length),
                        guidance_scale=7.0 if guidance_scale is None else float(guidance_scale),
                        num_train_timesteps=int(scheduler.config.num_train_timesteps),
                        shift=float(scheduler.config.get("shift", 1.0)), mu=mu)
        denoiser = FlowDenoiser.from_transformer(transformer, timestep_scale=info.num_train_timesteps,
                                                 guidance_scale=info.guidance_scale)
        return cls(denoiser.eval(), sd3, (int(tcfg.in_channels), side, side), info, directory)

    def save(self, directory: str | Path, denoiser: FlowDenoiser | None = None, link: bool = True) -> Path:
        """Write a ``StableDiffusion3Pipeline`` directory with ``denoiser``'s transformer (default:
        this pipeline's). ``link``: the other components are symbolic links to this pipeline's
        directory (no copy of the text encoders); otherwise every component is written."""
        directory = Path(directory)
        transformer = (denoiser or self.denoiser).transformer
        if not link or self.directory is None:
            sd3 = type(self.sd3)(**{**self.sd3.components, "transformer": transformer})
            sd3.save_pretrained(str(directory))
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        transformer.save_pretrained(str(directory / "transformer"))
        source = self.directory.resolve()
        for entry in source.iterdir():
            if entry.name == "transformer":
                continue
            target = directory / entry.name
            if target.is_symlink() or target.is_file():
                target.unlink()
            if entry.name == "model_index.json":
                target.write_text(entry.read_text())
            elif not target.exists():
                os.symlink(entry, target, target_is_directory=entry.is_dir())
        return directory


# ----------------------------------------------------------------------------- the GRAFT problem
def flow_step(eta: float):
    """The sampler step: Euler (``eta = 0``) or Flow-GRPO's SDE with noise level ``eta``."""
    return flow_sde_step(float(eta))


def flow_log_prob(eta: float):
    """Per-step log p_theta(x_next | x) [B] (summed over the latent) of :func:`flow_step` (``eta``
    > 0), the policy being called as in sampling (guided when the batch carries ``uncond``)."""
    return flow_sde_log_prob(float(eta))


def make_flow_problem(pipe: FlowT2IPipeline, prompts: Sequence[str], reward, n_steps: int, eta: float,
                      encoder: FlowPromptEncoder | None = None,
                      drop: Callable[[PromptBatch, torch.Generator | None], PromptBatch] | None = None,
                      scorer=None) -> GraftProblem:
    """The flow pipeline's :class:`GraftProblem`: prior N(0, I) on the latent shape, the scheduler's
    shifted sigma grid, :func:`flow_step` (Euler for ``eta = 0``), the core's linear-flow loss on the
    conditional velocity (guidance 1) started at the split's sigma, conditions = ``prompts``.
    ``drop(cond, generator)`` replaces prompts by the empty one before the loss (condition dropout)."""
    encoder = encoder or pipe.prompt_encoder()
    guided = pipe.denoiser.guidance_scale != 1.0
    shape = pipe.state_shape

    def loss(model, x, t, cond, gen):
        v = lambda x_s, s, c: model(x_s, s, c, guidance_scale=1.0)  # noqa: E731
        return flow_matching_loss(v, x, t, drop(cond, gen) if drop is not None else cond, gen)

    return GraftProblem(
        prior=lambda n, g: torch.randn(n, *shape, generator=g),
        times=pipe.times(n_steps),
        step=flow_step(eta),
        loss=loss,
        reward=reward,
        conditions=list(prompts),
        collate=lambda items: encoder(items, guidance=guided),
        score=None if scorer is None else scorer.score,
        on_round=None if scorer is None else scorer.on_round,
    )


# ----------------------------------------------------------------------------- LoRA export / reload
def flow_lora_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys of a LoRA-wrapped :class:`FlowDenoiser` -> diffusers transformer LoRA keys
    (``base_model.model.transformer.X.lora_A.default.weight`` -> ``X.lora_A.weight``)."""
    return diffusers_lora_state(weights, "transformer")


def export_flow_lora(weights: dict[str, torch.Tensor], directory: str | Path, rank: int, alpha: float,
                     targets: Sequence[str]) -> Path:
    """Write the transformer LoRA with ``StableDiffusion3Pipeline.save_lora_weights`` (read back by
    ``pipe.load_lora_weights(directory)``)."""
    from diffusers import StableDiffusion3Pipeline

    meta = {"r": rank, "lora_alpha": alpha or rank, "target_modules": list(targets or TRANSFORMER_ATTENTION)}
    StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=flow_lora_state(weights),
                                               transformer_lora_adapter_metadata=meta)
    return Path(directory)


def load_flow_lora_head(base: FlowDenoiser, lora_dir: str | Path) -> FlowDenoiser:
    """A copy of ``base`` with the LoRA in ``lora_dir`` (diffusers format) loaded and fused."""
    return fused_lora_copy(base, lora_dir, "transformer")


__all__ = ["FLOW_PIPELINES", "TRANSFORMER_ATTENTION", "FlowDenoiser", "FlowInfo", "FlowPromptEncoder",
           "FlowT2IPipeline", "export_flow_lora", "flow_lacks", "flow_log_prob", "flow_lora_state", "flow_step",
           "is_flow_directory", "load_flow_lora_head", "make_flow_problem", "pipeline_kind"]
