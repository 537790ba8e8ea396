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

The same holds for every flow family (:mod:`.pipelines`: SD3, FLUX.1, Qwen-Image, SANA): each family's
adapter calls its transformer in its own timestep / guidance / latent-packing convention and returns v
on unpacked latents [B, C, h, w], so the sampler, the losses, LoRA and the policy-gradient density
above are shared. The family is read from ``model_index.json``'s ``_class_name``.

Not supported (refused): inverted sigmas and the scheduler's ``stochastic_sampling``; pipeline classes
outside :data:`.pipelines.FLOW_CLASSES` and the UNet ones.
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
from .pipelines import FAMILIES, FLOW_CLASSES, TRANSFORMER_ATTENTION, UNET_CLASSES, family, stack_embeddings

# model_index.json classes read as flow-matching pipelines (one adapter per family, .pipelines)
FLOW_PIPELINES = tuple(FLOW_CLASSES)
# the components a StableDiffusion3Pipeline directory must have (text_encoder_3 / tokenizer_3, T5, are optional)
SD3_PARTS = FAMILIES["sd3"].parts
# precision names of --precision and their dtypes (frozen parts; LoRA parameters stay float32)
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of ``--precision`` (fp32, bf16, fp16); anything else is refused naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


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
    """``"world"`` (pgraft.json), a flow family's name (``"sd3"``, ``"flux"``, ``"qwen_image"``,
    ``"sana"``: the :data:`.pipelines.FLOW_CLASSES` entry of ``model_index.json``'s ``_class_name``) or
    ``"sd"`` (a UNet ``StableDiffusionPipeline``, or no model_index.json: read as a DDIM Stable Diffusion
    checkpoint). Refused with a one-line ValueError: another pipeline class (named, with the supported
    ones), and a flow-family directory missing a component (named)."""
    directory = Path(directory)
    if (directory / PGRAFT_JSON).is_file():
        return "world"
    cls = _read_json(directory / "model_index.json").get("_class_name")
    if cls in FLOW_CLASSES:
        name = FLOW_CLASSES[cls]
        lacks = FAMILIES[name].lacks(directory)
        if lacks is not None:
            raise ValueError(f"{directory} is not a loadable {cls} directory: {lacks}")
        return name
    if cls is None or cls in UNET_CLASSES:
        return "sd"
    raise ValueError(f"{directory} holds a {cls} (model_index.json); supported pipeline classes: "
                     f"{', '.join([*UNET_CLASSES, *FLOW_CLASSES])}")


def is_flow_directory(directory: str | Path) -> bool:
    return Path(directory).is_dir() and pipeline_kind(directory) in FAMILIES


def flow_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a loadable flow pipeline of its ``model_index.json`` class
    (``StableDiffusion3Pipeline`` when it names none; None: nothing)."""
    cls = _read_json(Path(directory) / "model_index.json").get("_class_name")
    return FAMILIES[FLOW_CLASSES.get(cls, "sd3")].lacks(Path(directory))


# ----------------------------------------------------------------------------- denoiser
class FlowDenoiser(nn.Module):
    """v_theta(x, t, cond) around a flow family's transformer (see the module docstring).

    x [B, C, h, w] latents (unpacked for every family), t [B] = sigma in [0, 1], cond a
    :class:`~.model.PromptBatch`. With guidance scale w != 1 and ``cond.uncond`` set, returns the
    family's guided velocity (SD3, SANA: v_u + w (v_c - v_u) on one doubled batch, unconditional half
    first, as diffusers; FLUX: true CFG; Qwen-Image: true CFG rescaled to the conditional norm); losses
    call it with ``guidance_scale=1``. ``family`` names the adapter (:mod:`.pipelines`);
    ``embedded_guidance`` is FLUX.1-dev's guidance embedding (None: the family default). Inputs are cast
    to the transformer's dtype, the output to x's.
    """

    def __init__(self, transformer: dict[str, Any], timestep_scale: float = 1000.0, guidance_scale: float = 7.0,
                 family: str = "sd3", embedded_guidance: float | None = None) -> None:
        super().__init__()
        self.family = family
        self.transformer = _family(family).transformer_type().from_config(transformer)
        self.timestep_scale = float(timestep_scale)
        self.guidance_scale = float(guidance_scale)
        self.embedded_guidance = None if embedded_guidance is None else float(embedded_guidance)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, timestep_scale: float = 1000.0,
                         guidance_scale: float = 7.0, family: str = "sd3",
                         embedded_guidance: float | None = None) -> "FlowDenoiser":
        """Wrap an existing (pretrained) transformer without re-initialising it."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.transformer = transformer
        model.timestep_scale, model.guidance_scale = float(timestep_scale), float(guidance_scale)
        model.family = family
        model.embedded_guidance = None if embedded_guidance is None else float(embedded_guidance)
        return model

    def init_kwargs(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild this module (core ``save_pretrained`` / ``load_pretrained``);
        ``family`` / ``embedded_guidance`` only when not SD3's defaults (runs written before them resume)."""
        config = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        out = {"transformer": json.loads(json.dumps(config, default=str)),
               "timestep_scale": self.timestep_scale, "guidance_scale": self.guidance_scale}
        if getattr(self, "family", "sd3") != "sd3":
            out["family"] = self.family
        if getattr(self, "embedded_guidance", None) is not None:
            out["embedded_guidance"] = self.embedded_guidance
        return out

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The SD3 transformer's timestep input for core times (sigmas) t: ``t * num_train_timesteps``."""
        return t.float() * self.timestep_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptBatch, guidance_scale: float | None = None) -> torch.Tensor:
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return _family(getattr(self, "family", "sd3")).velocity(self, x, t, cond, w).to(x.dtype)


def _family(name: str):
    return family(name)


# ----------------------------------------------------------------------------- text side
class FlowPromptEncoder:
    """The pipeline's own ``encode_prompt`` through its family adapter -> :class:`~.model.PromptBatch`
    (``pooled`` set for SD3 / FLUX, ``mask`` for Qwen-Image / SANA). Embeddings are computed once per
    prompt and memoised on the CPU (the encoders are frozen); :meth:`release` then moves the text
    encoders off the accelerator (a run that has embedded all its prompts no longer needs them there).

    SD3 (CLIP-L + CLIP-G, and T5 when the directory has it; T5 absent gives diffusers' zero block)."""

    def __init__(self, sd3, max_sequence_length: int = 256, device: str | torch.device | None = None,
                 family: str | None = None) -> None:
        self.sd3 = sd3
        self.family = _family(family or FLOW_CLASSES.get(type(sd3).__name__, "sd3"))
        self.max_sequence_length = int(max_sequence_length)
        self.device = torch.device(device) if device is not None else local_device()
        for encoder in self.family.text_encoders(sd3):
            encoder.to(self.device).eval().requires_grad_(False)
        self._cache: dict[str, Any] = {}

    @torch.no_grad()
    def _entries(self, prompts: Sequence[str]) -> list:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            entries = self.family.encode(self.sd3, missing, self.max_sequence_length, self.device)
            self._cache.update(zip(missing, entries))
        return [self._cache[p] for p in prompts]

    @torch.no_grad()
    def _negative(self):
        """The empty negative prompt (diffusers' default); SANA encodes it without its instruction."""
        key = "\0negative"
        if key not in self._cache:
            encode_negative = getattr(self.family, "encode_negative", None)
            self._cache[key] = (encode_negative(self.sd3, self.max_sequence_length, self.device)
                                if encode_negative is not None else self._entries([""])[0])
        return self._cache[key]

    def embed(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds [B, L, D], pooled_prompt_embeds [B, P] or None) of ``prompts``, on the CPU."""
        embeds, pooled, _ = stack_embeddings(self._entries(list(prompts)))
        return embeds, pooled

    def precompute(self, prompts: Sequence[str], guidance: bool = True) -> None:
        """Embed every prompt of a run (and the negative one) now, so the encoders can be released."""
        self._entries(list(prompts))
        if guidance:
            self._negative()

    def release(self) -> None:
        """Move the text encoders to the CPU (their embeddings are cached)."""
        for encoder in self.family.text_encoders(self.sd3):
            encoder.to("cpu")
        self.device = torch.device("cpu")

    def __call__(self, prompts: Sequence[str], guidance: bool = True) -> PromptBatch:
        prompts = list(prompts)
        embeds, pooled, mask = stack_embeddings(self._entries(prompts))
        if not guidance:
            return PromptBatch(prompts, embeds, None, pooled, None, mask, None)
        unc, unc_pooled, unc_mask = stack_embeddings([self._negative()])
        return PromptBatch(prompts, embeds, unc, pooled, unc_pooled, mask, unc_mask)


# ----------------------------------------------------------------------------- pipeline
@dataclass
class FlowInfo:
    """Sampler settings of a flow pipeline (read from its scheduler and transformer configs);
    ``kind`` is the family (:mod:`.pipelines`)."""

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
    """A loaded flow-matching diffusers pipeline (``sd3``: the ``StableDiffusion3Pipeline``,
    ``FluxPipeline``, ``QwenImagePipeline`` or ``SanaPipeline`` object with its encoders, tokenizers,
    VAE, scheduler) and its transformer as a :class:`FlowDenoiser`; same interface as
    :class:`~.model.T2IPipeline` where the app uses it (``denoiser``, ``state_shape``,
    ``prompt_encoder``, ``decode``, ``encode_images``). ``kind`` is the family name."""

    denoiser: FlowDenoiser
    sd3: Any
    state_shape: tuple[int, int, int]
    info: FlowInfo
    directory: Path | None = None
    kind: str = "sd3"
    _encoder: FlowPromptEncoder | None = None
    decode_chunk: int = 8

    @property
    def family(self):
        """The family adapter (:mod:`.pipelines`)."""
        return _family(self.kind)

    @property
    def vae(self) -> nn.Module:
        return self.sd3.vae

    @property
    def scheduler(self):
        return self.sd3.scheduler

    def times(self, n_steps: int) -> torch.Tensor:
        """The sampler's grid [n_steps + 1], float64, descending 1 -> 0: the scheduler's sigmas as the
        family's ``__call__`` sets them for ``n_steps`` (its shift and the resolution's ``mu`` applied),
        exactly the ones diffusers' pipeline steps on."""
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
        return self.family.grid(self.scheduler, n_steps, self.info.mu)

    def prompt_encoder(self, device: str | torch.device | None = None) -> FlowPromptEncoder:
        """The pipeline's prompt encoder (one per pipeline, so its cache is shared)."""
        if self._encoder is None or (device is not None and torch.device(device) != self._encoder.device):
            self._encoder = FlowPromptEncoder(self.sd3, self.info.max_sequence_length, device, self.kind)
        return self._encoder

    def _vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [-1, 1], float32 on the CPU, decoded ``chunk`` latents at a
        time (default :attr:`decode_chunk`: the VAE's activations at 1024 px are the memory peak)."""
        chunk = int(chunk or self.decode_chunk)
        return torch.cat([self.family.from_latents(self.vae, x[i:i + chunk]) for i in range(0, len(x), chunk)])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (the family's normalisation), on the CPU."""
        return self.family.to_latents(self.vae, images)

    @classmethod
    def load(cls, directory: str | Path, guidance_scale: float | None = None, dtype: torch.dtype = torch.float32,
             max_sequence_length: int | None = None, image_size: int | None = None,
             embedded_guidance: float | None = None) -> "FlowT2IPipeline":
        """Read a flow pipeline directory of any supported family (:func:`pipeline_kind`), its frozen
        parts in ``dtype``. ``guidance_scale`` None: the family's default (SD3 7, FLUX 1 (no CFG),
        Qwen-Image 4, SANA 4.5); ``image_size`` None: the family's default resolution;
        ``embedded_guidance``: FLUX.1-dev's guidance embedding (None: 3.5)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        kind = pipeline_kind(directory)
        if kind not in FAMILIES:
            raise ValueError(f"{directory} is not a flow-matching pipeline directory "
                             f"(supported classes: {', '.join(FLOW_PIPELINES)})")
        fam = FAMILIES[kind]
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; `torch_dtype` works in every version
            warnings.simplefilter("ignore", FutureWarning)
            pipe = fam.pipeline_type().from_pretrained(str(directory), torch_dtype=dtype, **fam.load_kwargs(directory))
        fam.check_scheduler(pipe)
        transformer = pipe.transformer.eval().requires_grad_(False)
        pipe.vae.eval().requires_grad_(False).to(local_device())
        size = int(image_size) if image_size is not None else fam.default_image_size(pipe)
        shape = fam.latent_shape(pipe, size)
        scheduler = pipe.scheduler
        info = FlowInfo(kind=kind, image_size=size,
                        max_sequence_length=int(max_sequence_length or fam.max_sequence_length),
                        guidance_scale=fam.default_guidance if guidance_scale is None else float(guidance_scale),
                        num_train_timesteps=int(scheduler.config.num_train_timesteps),
                        shift=float(scheduler.config.get("shift", 1.0)), mu=fam.mu(pipe, shape))
        denoiser = FlowDenoiser.from_transformer(transformer, timestep_scale=info.num_train_timesteps,
                                                 guidance_scale=info.guidance_scale, family=kind,
                                                 embedded_guidance=embedded_guidance)
        return cls(denoiser.eval(), pipe, shape, info, directory, kind)

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
    if drop is not None and pipe.family.masked:
        raise ValueError(f"cond_dropout is not supported for {pipe.kind} (its prompts carry attention masks)")
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
                     targets: Sequence[str], kind: str = "sd3") -> Path:
    """Write the transformer LoRA with the family pipeline's ``save_lora_weights`` (e.g.
    ``FluxPipeline.save_lora_weights``; read back by ``pipe.load_lora_weights(directory)``)."""
    fam = _family(kind)
    meta = {"r": rank, "lora_alpha": alpha or rank, "target_modules": list(targets or fam.lora_targets)}
    fam.save_lora(Path(directory), flow_lora_state(weights), meta)
    return Path(directory)


def load_flow_lora_head(base: FlowDenoiser, lora_dir: str | Path) -> FlowDenoiser:
    """A copy of ``base`` with the LoRA in ``lora_dir`` (diffusers format) loaded and fused."""
    return fused_lora_copy(base, lora_dir, "transformer")


__all__ = ["FLOW_PIPELINES", "PRECISIONS", "TRANSFORMER_ATTENTION", "precision_dtype", "FlowDenoiser", "FlowInfo", "FlowPromptEncoder",
           "FlowT2IPipeline", "export_flow_lora", "flow_lacks", "flow_log_prob", "flow_lora_state", "flow_step",
           "is_flow_directory", "load_flow_lora_head", "make_flow_problem", "pipeline_kind"]
