"""FLUX.1 (``FluxPipeline``): CLIP-L pooled + T5 sequence prompts, latents packed into 2x2 patch tokens
with (0, row, col) position ids, the transformer at timestep sigma (``__call__`` divides the scheduler's
1000 sigma by 1000), the guidance *embedding* for guidance-distilled checkpoints (dev: 3.5 by default;
schnell has none), no classifier-free guidance by default (``true_cfg_scale`` 1: a guidance scale != 1
with the empty prompt runs two transformer calls, as FluxPipeline's true CFG). The grid is
``set_timesteps(sigmas=linspace(1, 1/n, n), mu)`` with ``mu`` from the packed sequence length."""

from __future__ import annotations

import numpy as np
import torch

from .base import FlowFamily, PromptEmbedding, pack_latents, unpack_latents


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 3] of the packed latent tokens: (0, row, col) (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    parts = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_guidance = 1.0
    default_embedded_guidance = 3.5
    max_sequence_length = 512

    def default_image_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * self.vae_scale_factor(pipe)

    def latent_shape(self, pipe, image_size):
        side = 2 * (image_size // (self.vae_scale_factor(pipe) * 2))
        return int(pipe.transformer.config.in_channels) // 4, side, side

    def mu(self, pipe, shape):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = pipe.scheduler.config
        return calculate_shift((shape[1] // 2) * (shape[2] // 2), c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def grid(self, scheduler, n_steps, mu):
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps)
        kwargs = {"mu": mu} if scheduler.config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
        return scheduler.sigmas.detach().cpu().double().clone()

    def encode(self, pipe, prompts, max_sequence_length, device):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length)
        return [PromptEmbedding(e.cpu(), p.cpu()) for e, p in zip(embeds, pooled)]

    def _call(self, denoiser, tokens, ts, emb, pooled, ids, guidance):
        return denoiser.transformer(hidden_states=tokens, timestep=ts, guidance=guidance, pooled_projections=pooled,
                                    encoder_hidden_states=emb, txt_ids=ids[0], img_ids=ids[1]).sample

    def velocity(self, denoiser, x, t, cond, w):
        transformer = denoiser.transformer
        dtype = next(transformer.parameters()).dtype
        b, _, h, w_ = x.shape
        tokens = pack_latents(x.to(dtype))
        ts = (t.to(x.device, torch.float32) * denoiser.timestep_scale).to(dtype) / denoiser.timestep_scale
        guidance = None
        if transformer.config.guidance_embeds:
            g = denoiser.embedded_guidance if denoiser.embedded_guidance is not None else self.default_embedded_guidance
            guidance = torch.full((b,), float(g), device=x.device, dtype=torch.float32)
        emb, pooled = cond.embeds.to(x.device, dtype), cond.pooled.to(x.device, dtype)
        ids = (torch.zeros(emb.shape[1], 3, device=x.device, dtype=dtype), image_ids(h, w_, x.device, dtype))
        v = self._call(denoiser, tokens, ts, emb, pooled, ids, guidance)
        if w != 1.0 and cond.uncond is not None:
            unc = cond.uncond.to(x.device, dtype).expand(b, -1, -1)
            unc_pooled = cond.uncond_pooled.to(x.device, dtype).expand(b, -1)
            ids_u = (torch.zeros(unc.shape[1], 3, device=x.device, dtype=dtype), ids[1])
            v_u = self._call(denoiser, tokens, ts, unc, unc_pooled, ids_u, guidance)
            v = v_u + w * (v - v_u)
        return unpack_latents(v, h, w_)

    def pipeline_latents(self, x):
        return pack_latents(x)

    def from_pipeline_latents(self, latents, shape):
        return unpack_latents(latents, shape[1], shape[2])
