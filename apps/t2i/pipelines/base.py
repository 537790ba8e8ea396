"""The small interface every flow-matching pipeline family implements (SD3, FLUX.1, Qwen-Image, SANA).

A family adapter is stateless: it reads a loaded diffusers pipeline (``pipe``) and its transformer and
says, in the family's own conventions,

- which ``model_index.json`` class it reads, which components a directory must hold and which LoRA
  targets its transformer has (:attr:`FlowFamily.pipeline_class`, :attr:`parts`, :attr:`lora_targets`);
- how prompts become conditioning (:meth:`encode`: one entry per prompt, cached by the caller);
- the latent shape and the sampler's sigma grid (:meth:`latent_shape`, :meth:`grid`: the scheduler's
  own sigmas, shifted as the family's ``__call__`` shifts them);
- the velocity v = eps - x_0 at core time t = sigma (:meth:`velocity`: the transformer called with the
  family's timestep scale, guidance embedding, latent packing and classifier-free guidance rule);
- the VAE's latent normalisation (:meth:`to_latents`, :meth:`from_latents`).

The core only ever sees unpacked latents [B, C, h, w] and the linear flow x_s = (1 - s) x_0 + s eps:
packing FLUX / Qwen-Image latents into 2x2 patch tokens is a permutation, done inside
:meth:`velocity`, so Euler and Flow-GRPO's SDE step act on the same numbers in either layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# LoRA targets shared by every family: the attention projections of the image stream
TRANSFORMER_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's conditioning: ``embeds`` [L, D], ``pooled`` [P] (SD3, FLUX) and ``mask`` [L]
    (Qwen-Image, SANA: 1 on tokens, 0 on padding), on the CPU."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches as tokens (FLUX's and Qwen-Image's ``_pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def stack_embeddings(entries: Sequence[PromptEmbedding]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(embeds [B, L, D], pooled [B, P] or None, mask [B, L] or None) of per-prompt entries, zero-padded
    to the longest (Qwen-Image's prompts have their own lengths, padded with zeros and mask 0 as its
    ``encode_prompt`` pads a batch); the mask is None when no entry has one."""
    length = max(e.embeds.shape[0] for e in entries)
    embeds = torch.stack([torch.cat([e.embeds, e.embeds.new_zeros(length - e.embeds.shape[0], e.embeds.shape[1])])
                          for e in entries])
    pooled = None if entries[0].pooled is None else torch.stack([e.pooled for e in entries])
    mask = None
    if entries[0].mask is not None:
        mask = torch.stack([torch.cat([e.mask, e.mask.new_zeros(length - e.mask.shape[0])]) for e in entries])
    return embeds, pooled, mask


class FlowFamily:
    """Base adapter: the defaults are Stable Diffusion 3's (see :mod:`.sd3`); each family overrides
    what differs. Instances are stateless and shared (the registry in :mod:`.`)."""

    name: str = ""
    pipeline_class: str = ""
    transformer_class: str = ""
    parts: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = TRANSFORMER_ATTENTION
    default_guidance: float = 1.0  # classifier-free guidance scale by default (1: none)
    default_embedded_guidance: float | None = None  # FLUX.1-dev's guidance embedding
    masked: bool = False  # prompts carry attention masks (condition dropout is not supported)
    max_sequence_length: int = 256

    # ------------------------------------------------------------------ loading
    def lacks(self, directory: Path) -> str | None:
        """What keeps ``directory`` from being this family's pipeline directory (None: nothing)."""
        for part in self.parts:
            if not (Path(directory) / part).is_dir():
                return f"no {part}/ (a {self.pipeline_class} directory has {', '.join(self.parts)})"
        return None

    def load_kwargs(self, directory: Path) -> dict[str, Any]:
        """Extra ``from_pretrained`` kwargs (components the directory may leave out)."""
        return {}

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def transformer_type(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def check_scheduler(self, pipe) -> None:
        """Read a flow-matching scheduler config as ``FlowMatchEulerDiscreteScheduler`` (the Euler /
        SDE sampler runs on its sigmas); refuse inverted sigmas and stochastic sampling."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        config = pipe.scheduler.config
        if config.get("invert_sigmas") or config.get("stochastic_sampling"):
            raise ValueError(f"{self.pipeline_class}: schedulers with invert_sigmas / stochastic_sampling are not supported")

    # ------------------------------------------------------------------ latents and grid
    def vae_scale_factor(self, pipe) -> int:
        return int(pipe.vae_scale_factor)

    def default_image_size(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size) * self.vae_scale_factor(pipe)

    def latent_shape(self, pipe, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.vae_scale_factor(pipe)
        return int(pipe.transformer.config.in_channels), side, side

    def mu(self, pipe, shape: tuple[int, int, int]) -> float | None:
        """The dynamic-shifting ``mu`` of the resolution (None: the scheduler's static shift)."""
        return None

    def grid(self, scheduler, n_steps: int, mu: float | None) -> torch.Tensor:
        """The sampler's sigmas [n_steps + 1], float64, 1 -> 0 (``set_timesteps(n_steps)``)."""
        kwargs = {"mu": mu} if mu is not None else {}
        scheduler.set_timesteps(n_steps, device="cpu", **kwargs)
        return scheduler.sigmas.detach().cpu().double().clone()

    # ------------------------------------------------------------------ text side
    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]

    def encode(self, pipe, prompts: list[str], max_sequence_length: int, device) -> list[PromptEmbedding]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the transformer
    def velocity(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond, w: float) -> torch.Tensor:
        """v [B, C, h, w] at core times t [B] (sigmas), guided with scale ``w`` when ``cond.uncond`` is set."""
        raise NotImplementedError

    # ------------------------------------------------------------------ VAE
    def from_latents(self, vae, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [-1, 1] (float32 on the CPU): vae.decode(x / scale + shift)."""
        cfg = vae.config
        z = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        p = next(vae.parameters())
        return vae.decode(z.to(p.device, p.dtype)).sample.float().clamp(-1, 1).cpu()

    def to_latents(self, vae, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (posterior mean - shift) * scale, on the CPU."""
        cfg = vae.config
        p = next(vae.parameters())
        mean = vae.encode(images.to(p.device, p.dtype)).latent_dist.mean.float().cpu()
        return (mean - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    # ------------------------------------------------------------------ diffusers' own pipeline, for comparisons
    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Our latents [B, C, h, w] as the family's ``__call__(latents=...)`` takes them."""
        return x

    def from_pipeline_latents(self, latents: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """``__call__(output_type="latent")``'s latents as ours [B, C, h, w]."""
        return latents

    def save_lora(self, directory: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write a transformer LoRA with the family pipeline's ``save_lora_weights`` (read back by
        ``pipe.load_lora_weights(directory)``)."""
        self.pipeline_type().save_lora_weights(str(directory), transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=meta)
