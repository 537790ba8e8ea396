"""Text-to-image models: a diffusers ``UNet2DConditionModel`` noise predictor behind the core's
``model(x, t_vec, cond)`` signature, a CLIP text encoder, and a pipeline directory format shared
by the embedded world and real Stable Diffusion checkpoints.

Time convention (core VP): continuous t in [0, 1], x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps,
the model predicts eps. The UNet's timestep input is ``t * timestep_scale + timestep_shift``:

- embedded world: abar = core ``cosine_alpha_bar``, timestep = 1000 t;
- Stable Diffusion: abar interpolates the scheduler's discrete ``alphas_cumprod`` table
  (abar(k/N) = alphas_cumprod[k-1], abar(0) = 1, log-linear in between) and timestep = N t - 1,
  so every grid point k/N feeds the UNet exactly the discrete step it was trained on.

Pipeline directory (diffusers layout, every part written by ``save_pretrained``)::

    unet/  text_encoder/  tokenizer/  [vae/]  scheduler/  [pgraft.json]

``pgraft.json`` marks an embedded-world pipeline (pixel space, cosine schedule); without it the
directory is read as a Stable Diffusion checkpoint (latent space via ``vae/``, table schedule from
``scheduler/``). :meth:`T2IPipeline.load` reads both with the same code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pgraft.core.schedules import cosine_alpha_bar
from pgraft.core.state import RESTORE_DIR, read_json

from .presets import PRESETS, ModelPreset  # noqa: F401 (model sizes; re-exported)

PGRAFT_JSON = "pgraft.json"
# LoRA targets: the UNet's attention projections (diffusers' Attention); the text encoder's
# CLIP attention is named q_proj/k_proj/... and the VAE lives outside the denoiser, so neither
# is touched.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def unet_config(p: ModelPreset) -> dict[str, Any]:
    """Kwargs of a (space-to-depth) pixel-space ``UNet2DConditionModel`` for preset ``p``."""
    channels = 3 * p.patch_size**2
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in p.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p.attention))
    return {
        "sample_size": p.image_size // p.patch_size, "in_channels": channels, "out_channels": channels,
        "down_block_types": list(down), "up_block_types": list(up),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if p.attention[-1] else None,
        "block_out_channels": list(p.block_out_channels), "layers_per_block": p.layers_per_block,
        "norm_num_groups": p.norm_groups, "cross_attention_dim": p.text_hidden,
        "attention_head_dim": [max(1, c // p.head_dim) for c in p.block_out_channels],
    }


# ----------------------------------------------------------------------------- tokenizer / text encoder
def _fix_token_ids(vocab_json: Path, merges_txt: Path) -> None:
    """Renumber a trained BPE vocabulary so the same texts always give the same ids: the BPE trainer
    numbers its initial symbols (letters, ``x</w>`` word ends) in hash-set order, which differs from
    run to run (the merges do not). Special tokens keep their ids, the other initial symbols follow
    in sorted order, then each merge's product in merge order."""
    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    pairs = [line.split() for line in merges_txt.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#version")]
    products = list(dict.fromkeys("".join(pair) for pair in pairs))
    specials = [t for t in ("<|startoftext|>", "<|endoftext|>") if t in vocab]
    initial = sorted(set(vocab) - set(products) - set(specials))
    order = specials + initial + [t for t in products if t in vocab]
    assert len(order) == len(vocab), "every token is a special, an initial symbol or a merge product"
    vocab_json.write_text(json.dumps({t: i for i, t in enumerate(order)}, ensure_ascii=False), encoding="utf-8")


def train_tokenizer(texts: Sequence[str], directory: str | Path, vocab_size: int = 256):
    """Train a CLIP-format BPE tokenizer (``</w>`` word ends, lower-case) on ``texts`` offline with
    the ``tokenizers`` library, write ``vocab.json`` + ``merges.txt`` and load it as a
    ``CLIPTokenizer``. Letters and digits are in the initial alphabet, so words outside the
    grammar still tokenize (character by character)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,'-"))
    tok.train_from_iterator(list(texts), trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(directory))
    _fix_token_ids(directory / "vocab.json", directory / "merges.txt")
    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...): load from the directory
    return CLIPTokenizer.from_pretrained(str(directory))


def text_encoder_config(p: ModelPreset, vocab_size: int) -> dict[str, Any]:
    """Kwargs of a ``CLIPTextConfig``; ids 0/1 are <|startoftext|>/<|endoftext|> (= pad)."""
    return {"vocab_size": vocab_size, "hidden_size": p.text_hidden, "intermediate_size": 2 * p.text_hidden,
            "num_hidden_layers": p.text_layers, "num_attention_heads": p.text_heads,
            "max_position_embeddings": p.max_length, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length] (padded / truncated as Stable Diffusion does)."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


@dataclass
class PromptBatch:
    """The condition the trainer hands to model and reward: prompts and their text embeddings.

    ``embeds`` [B, L, D] feed the UNet's cross-attention; ``uncond`` [1, L, D] is the empty
    prompt's embedding (classifier-free guidance), None when guidance is off. Flow-matching (SD3)
    pipelines also condition on pooled text embeddings: ``pooled`` [B, P] and ``uncond_pooled``
    [1, P] (None for UNet pipelines). Qwen-Image and SANA prompts carry attention masks: ``mask``
    [B, L] and ``uncond_mask`` [1, L'] (1 on tokens, 0 on padding; None elsewhere).
    """

    prompts: list[str]
    embeds: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def take_samples(self, index: torch.Tensor) -> PromptBatch:
        """The condition of the samples ``index`` (a 1-d index tensor) only: the per-sample prompts,
        embeddings and pooled embeddings are selected, the shared unconditional ones kept (what
        :func:`pgraft.core.inversion.invert_step` calls when samples leave the batch)."""
        rows = index.tolist()
        return PromptBatch([self.prompts[i] for i in rows], self.embeds[index.to(self.embeds.device)], self.uncond,
                           None if self.pooled is None else self.pooled[index.to(self.pooled.device)],
                           self.uncond_pooled, None if self.mask is None else self.mask[index.to(self.mask.device)],
                           self.uncond_mask)


class PromptEncoder:
    """Frozen text encoder + tokenizer -> :class:`PromptBatch`. Embeddings are memoised per prompt
    string: the encoder is frozen, so this is a pure cache (a round re-encodes the same prompts
    for every sampler chunk and every fine-tuning batch)."""

    def __init__(self, text_encoder: nn.Module, tokenizer, max_length: int, device: str | torch.device = "cpu") -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            ids = tokenize(self.tokenizer, missing, self.max_length).to(self.device)
            out = self.text_encoder(ids).last_hidden_state
            self._cache.update(zip(missing, out))
        return torch.stack([self._cache[p] for p in prompts])

    def __call__(self, prompts: Sequence[str], guidance: bool = True) -> PromptBatch:
        prompts = list(prompts)
        return PromptBatch(prompts, self.embed(prompts), self.embed([""]) if guidance else None)


# ----------------------------------------------------------------------------- denoiser
class Denoiser(nn.Module):
    """eps_theta(x, t, cond) around a ``UNet2DConditionModel``.

    x [B, C, h, w] (pixels after space-to-depth, or SD latents), t [B] in [0, 1], cond a :class:`PromptBatch`. With guidance scale w > 1 and
    ``cond.uncond`` set, returns the classifier-free-guided eps_u + w (eps_c - eps_u) (one UNet call
    on the doubled batch); losses call it with ``guidance_scale=1`` (the conditional eps).

    ``prediction_type`` (diffusers' name): "epsilon", or "v_prediction" (the UNet outputs
    v = sqrt(abar) eps - sqrt(1-abar) x0, Salimans & Ho 2022; SD 2 at 768 px, and the embedded
    world's default, because an eps-model at abar(1) ~ 1e-5 cannot say anything about x0 there and
    samples drift to a wrong background). The output is always converted to eps, so samplers and
    losses see one parametrization; v needs the schedule, ``self.alpha_bar`` (set by the pipeline).
    """

    def __init__(self, unet: dict[str, Any], timestep_scale: float = 1000.0, timestep_shift: float = 0.0,
                 guidance_scale: float = 1.0, prediction_type: str = "epsilon",
                 alpha_bar: Callable[[torch.Tensor | float], torch.Tensor] | None = None) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel.from_config(unet)
        self.timestep_scale = float(timestep_scale)
        self.timestep_shift = float(timestep_shift)
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = _check_prediction_type(prediction_type)
        self.alpha_bar = alpha_bar

    @classmethod
    def from_unet(cls, unet: nn.Module, **kwargs: float) -> "Denoiser":
        """Wrap an existing (e.g. pretrained) UNet without re-initialising it."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.unet = unet
        model.timestep_scale = float(kwargs.get("timestep_scale", 1000.0))
        model.timestep_shift = float(kwargs.get("timestep_shift", 0.0))
        model.guidance_scale = float(kwargs.get("guidance_scale", 1.0))
        model.prediction_type = _check_prediction_type(kwargs.get("prediction_type", "epsilon"))
        model.alpha_bar = kwargs.get("alpha_bar")
        return model

    def init_kwargs(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild this module (core ``save_pretrained`` / ``load_pretrained``).
        Not named ``config``: peft reads ``model.config`` as a dict-like model config."""
        unet = {k: v for k, v in dict(self.unet.config).items() if k != "_name_or_path"}
        return {"unet": json.loads(json.dumps(unet, default=str)),
                "timestep_scale": self.timestep_scale, "timestep_shift": self.timestep_shift,
                "guidance_scale": self.guidance_scale, "prediction_type": self.prediction_type}

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return (t.float() * self.timestep_scale + self.timestep_shift).clamp_min(0.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptBatch, guidance_scale: float | None = None) -> torch.Tensor:
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        ts = self.timesteps(t).to(x.device)
        emb = cond.embeds.to(x.device, x.dtype)
        if w == 1.0 or cond.uncond is None:
            out = self.unet(x, ts, encoder_hidden_states=emb).sample
        else:  # guidance is linear in the output, so it commutes with the v -> eps conversion
            unc = cond.uncond.to(x.device, x.dtype).expand_as(emb)
            out_u, out_c = self.unet(torch.cat([x, x]), torch.cat([ts, ts]),
                                     encoder_hidden_states=torch.cat([unc, emb])).sample.chunk(2)
            out = out_u + w * (out_c - out_u)
        if self.prediction_type == "epsilon":
            return out
        if self.alpha_bar is None:
            raise RuntimeError("a v-prediction Denoiser needs its schedule: set denoiser.alpha_bar")
        a = self.alpha_bar(t.double()).to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return a.sqrt() * out + (1 - a).sqrt() * x

    @property
    def loss_weighting(self) -> str:
        """The :func:`pgraft.core.losses.eps_matching_loss` weighting matching the parametrization."""
        return "v" if self.prediction_type == "v_prediction" else "eps"


def _check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return prediction_type


# ----------------------------------------------------------------------------- schedules
class TableAlphaBar:
    """abar(t) from a discrete ``alphas_cumprod`` table of N steps: abar(k/N) = table[k-1],
    abar(0) = 1, log-linear interpolation in between (t in [0, 1])."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.log_table = torch.cat([torch.zeros(1, dtype=torch.float64), table.log()])
        self.n = len(table)

    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
        pos = t * self.n
        lo = pos.floor().long().clamp(max=self.n - 1)
        frac = pos - lo
        return torch.exp(self.log_table[lo] * (1 - frac) + self.log_table[lo + 1] * frac)


# ----------------------------------------------------------------------------- pipeline
@dataclass
class PipelineInfo:
    """What ``pgraft.json`` records for an embedded-world pipeline (absent for SD checkpoints)."""

    preset: str = "default"
    image_size: int = 32
    max_length: int = 16
    schedule: str = "cosine"
    guidance_scale: float = 2.0
    n_steps: int = 20
    eta: float = 1.0
    patch_size: int = 1
    prediction_type: str = "epsilon"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class T2IPipeline:
    """Denoiser + text side (+ VAE for latent models) + noise schedule; see the module docstring."""

    denoiser: Denoiser
    text_encoder: nn.Module
    tokenizer: Any
    alpha_bar: Callable[[torch.Tensor | float], torch.Tensor]
    state_shape: tuple[int, int, int]
    info: PipelineInfo
    vae: nn.Module | None = None
    scheduler_config: dict[str, Any] | None = None

    @property
    def clip_sample(self) -> float | None:
        """Bound for the sampler's x0_hat: pixel pipelines live in [-1, 1] (space-to-depth is a
        permutation), so clipping is exact there and keeps a CPU-sized model from blowing up at
        the first steps (abar(1) = 1e-5, see :func:`pgraft.core.sampling.ddim_mean_std`); latent
        (VAE) pipelines are unbounded."""
        return 1.0 if self.vae is None else None

    def prompt_encoder(self, device: str | torch.device = "cpu") -> PromptEncoder:
        return PromptEncoder(self.text_encoder, self.tokenizer, self.info.max_length, device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler states -> images [B, 3, H, W] in [-1, 1] (depth-to-space in pixel space)."""
        if self.vae is None:
            return F.pixel_shuffle(x, self.info.patch_size).clamp(-1, 1)
        scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        return self.vae.decode(x.to(next(self.vae.parameters()).dtype) / scale).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> sampler states (space-to-depth in pixel space)."""
        if self.vae is None:
            return F.pixel_unshuffle(images, self.info.patch_size)
        scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        return self.vae.encode(images).latent_dist.mean * scale

    def save(self, directory: str | Path) -> Path:
        """Write the diffusers-layout directory (``unet/``, ``text_encoder/``, ``tokenizer/``, ...)."""
        from diffusers import DDIMScheduler

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.denoiser.unet.save_pretrained(directory / "unet")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        if self.scheduler_config is not None:
            DDIMScheduler.from_config(self.scheduler_config).save_pretrained(directory / "scheduler")
        if self.info.schedule == "cosine":
            (directory / PGRAFT_JSON).write_text(json.dumps(asdict(self.info), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, guidance_scale: float | None = None) -> "T2IPipeline":
        """Load an embedded-world pipeline or a local Stable Diffusion checkpoint (diffusers layout)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        for part in ("unet", "text_encoder", "tokenizer"):
            if not (directory / part).is_dir():
                raise ValueError(f"{directory} is not a diffusers text-to-image pipeline directory: missing {part}/ "
                                 "(expected unet/, text_encoder/, tokenizer/ and, for latent models, vae/ + scheduler/)")
        unet = UNet2DConditionModel.from_pretrained(directory / "unet")
        text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
        if (directory / PGRAFT_JSON).is_file():
            info = PipelineInfo(**read_json(directory / PGRAFT_JSON, fix=RESTORE_DIR))
            alpha_bar: Callable = cosine_alpha_bar
            scale, shift, vae, sched = 1000.0, 0.0, None, None
        else:
            if not (directory / "scheduler").is_dir() or not (directory / "vae").is_dir():
                raise ValueError(f"{directory} has no {PGRAFT_JSON}, so it is read as Stable Diffusion, "
                                 "which needs vae/ and scheduler/ subfolders")
            scheduler = DDIMScheduler.from_pretrained(directory / "scheduler")
            if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"only epsilon / v_prediction checkpoints are supported, {directory} predicts "
                                 f"{scheduler.config.prediction_type!r}")
            vae = AutoencoderKL.from_pretrained(directory / "vae").eval().requires_grad_(False)
            alpha_bar = TableAlphaBar(scheduler.alphas_cumprod)
            n = len(scheduler.alphas_cumprod)
            scale, shift, sched = float(n), -1.0, dict(scheduler.config)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            info = PipelineInfo(preset="sd", image_size=unet.config.sample_size * factor,
                                max_length=tokenizer.model_max_length, schedule="table", guidance_scale=7.5,
                                n_steps=50, eta=1.0, prediction_type=scheduler.config.prediction_type)
        if guidance_scale is not None:
            info.guidance_scale = guidance_scale
        denoiser = Denoiser.from_unet(unet, timestep_scale=scale, timestep_shift=shift,
                                      guidance_scale=info.guidance_scale, prediction_type=info.prediction_type,
                                      alpha_bar=alpha_bar)
        c, s = unet.config.in_channels, unet.config.sample_size
        return cls(denoiser.eval(), text_encoder.eval().requires_grad_(False), tokenizer, alpha_bar,
                   (c, s, s), info, vae, sched)


def build_world_pipeline(preset: str, prompts: Sequence[str], tokenizer_dir: str | Path, seed: int = 0,
                         guidance_scale: float = 2.0, prediction_type: str = "v_prediction") -> T2IPipeline:
    """A freshly initialised embedded-world pipeline: tokenizer trained on ``prompts`` (written to
    ``tokenizer_dir``), random CLIP text encoder and pixel-space UNet of ``preset``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(prompts, tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(p, len(tokenizer))))
    denoiser = Denoiser(unet_config(p), guidance_scale=guidance_scale, prediction_type=prediction_type,
                        alpha_bar=cosine_alpha_bar)
    info = PipelineInfo(preset=preset, image_size=p.image_size, max_length=p.max_length, guidance_scale=guidance_scale,
                        patch_size=p.patch_size, prediction_type=prediction_type)
    side = p.image_size // p.patch_size
    return T2IPipeline(denoiser, text_encoder, tokenizer, cosine_alpha_bar, (3 * p.patch_size**2, side, side), info)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_lora_state(weights: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """peft keys of a LoRA-wrapped denoiser -> diffusers LoRA keys of its ``module`` (``unet``, or
    ``transformer`` for SD3): ``base_model.model.<module>.X.lora_A.default.weight`` -> ``X.lora_A.weight``."""
    prefix = f"base_model.model.{module}."
    out = {}
    for k, v in weights.items():
        if "lora_" in k:
            if not k.startswith(prefix):
                raise ValueError(f"unexpected LoRA key {k!r} (expected the prefix {prefix!r})")
            out[k[len(prefix):].replace(".default", "")] = v
    if not out:
        raise ValueError("the checkpoint holds no LoRA weights (was the run a full fine-tune, --lora 0?)")
    return out


def fused_lora_copy(base: nn.Module, lora_dir: str | Path, module: str) -> nn.Module:
    """A copy of the denoiser ``base`` with the diffusers-format LoRA in ``lora_dir`` loaded into its
    ``module`` (``unet``, or ``transformer`` for SD3) and fused."""
    import copy

    head = copy.deepcopy(base)
    net = getattr(head, module)
    net.load_lora_adapter(str(lora_dir), prefix=module, adapter_name="graft",
                          weight_name="pytorch_lora_weights.safetensors", use_safetensors=True)
    net.fuse_lora(lora_scale=1.0)
    net.unload_lora()
    return head.eval()


__all__ = ["PRESETS", "ModelPreset", "Denoiser", "PromptBatch", "PromptEncoder", "T2IPipeline", "PipelineInfo",
           "TableAlphaBar", "build_world_pipeline", "train_tokenizer", "unet_config", "UNET_ATTENTION",
           "count_parameters", "tokenize", "text_encoder_config", "diffusers_lora_state",
           "fused_lora_copy"]
