"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): CLIP-L + CLIP-G (+ optional T5) prompts with
pooled embeddings, the transformer at timestep 1000 sigma, classifier-free guidance on one doubled
batch (unconditional half first), static shift or the resolution's ``mu``, VAE scale and shift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import FlowFamily, PromptEmbedding


class SD3Family(FlowFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    parts = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_guidance = 7.0
    max_sequence_length = 256

    def load_kwargs(self, directory: Path) -> dict[str, Any]:
        # text_encoder_3 / tokenizer_3 (T5) may be absent: diffusers then puts a zero block in its place
        return {} if (Path(directory) / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}

    def mu(self, pipe, shape):
        config = pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        seq = (shape[1] // pipe.transformer.config.patch_size) * (shape[2] // pipe.transformer.config.patch_size)
        return calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.16))

    def encode(self, pipe, prompts, max_sequence_length, device):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return [PromptEmbedding(e.cpu(), p.cpu()) for e, p in zip(embeds, pooled)]

    def velocity(self, denoiser, x, t, cond, w):
        if cond.pooled is None:
            raise ValueError("a flow-matching (SD3) denoiser needs pooled prompt embeddings (cond.pooled)")
        transformer = denoiser.transformer
        dtype = next(transformer.parameters()).dtype
        ts = denoiser.timesteps(t).to(x.device)
        emb, pooled = cond.embeds.to(x.device, dtype), cond.pooled.to(x.device, dtype)
        h = x.to(dtype)
        if w == 1.0 or cond.uncond is None:
            return transformer(hidden_states=h, timestep=ts, encoder_hidden_states=emb, pooled_projections=pooled).sample
        unc = cond.uncond.to(x.device, dtype).expand_as(emb)
        unc_pooled = cond.uncond_pooled.to(x.device, dtype).expand_as(pooled)
        v_u, v_c = transformer(hidden_states=torch.cat([h, h]), timestep=torch.cat([ts, ts]),
                               encoder_hidden_states=torch.cat([unc, emb]),
                               pooled_projections=torch.cat([unc_pooled, pooled])).sample.chunk(2)
        return v_u + w * (v_c - v_u)
