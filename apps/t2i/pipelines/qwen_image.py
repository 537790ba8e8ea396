"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL hidden states of the templated prompt (its first
``prompt_template_encode_start_idx`` tokens dropped, each prompt its own length, zero-padded with mask 0
in a batch), packed latents of the video VAE's single frame with ``img_shapes``, the transformer at
timestep sigma, ``true_cfg_scale`` guidance with the empty negative prompt and Qwen's rescale of the
guided velocity to the conditional one's norm per token; the VAE normalises latents per channel
(``latents_mean`` / ``latents_std``)."""

from __future__ import annotations

import torch

from .base import FlowFamily, PromptEmbedding, pack_latents, unpack_latents
from .flux import FluxFamily


class QwenImageFamily(FlowFamily):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    parts = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    default_guidance = 4.0
    masked = True
    max_sequence_length = 512

    def default_image_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * self.vae_scale_factor(pipe)

    latent_shape = FluxFamily.latent_shape
    grid = FluxFamily.grid

    def mu(self, pipe, shape):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        c = pipe.scheduler.config
        return calculate_shift((shape[1] // 2) * (shape[2] // 2), c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def encode(self, pipe, prompts, max_sequence_length, device):
        out = []
        for prompt in prompts:  # one at a time: each keeps its own length (the batch pads with zeros)
            embeds, _ = pipe.encode_prompt(prompt=[prompt], device=device, num_images_per_prompt=1,
                                           max_sequence_length=max_sequence_length)
            out.append(PromptEmbedding(embeds[0].cpu(), None, torch.ones(embeds.shape[1], dtype=torch.long)))
        return out

    def _call(self, denoiser, tokens, ts, emb, mask, shapes):
        return denoiser.transformer(hidden_states=tokens, timestep=ts, guidance=None, encoder_hidden_states=emb,
                                    encoder_hidden_states_mask=mask, img_shapes=shapes).sample

    def velocity(self, denoiser, x, t, cond, w):
        dtype = next(denoiser.transformer.parameters()).dtype
        b, _, h, w_ = x.shape
        tokens = pack_latents(x.to(dtype))
        ts = (t.to(x.device, torch.float32) * denoiser.timestep_scale).to(dtype) / denoiser.timestep_scale
        shapes = [[(1, h // 2, w_ // 2)]] * b
        mask = None if cond.mask is None or bool(cond.mask.all()) else cond.mask.to(x.device)
        v = self._call(denoiser, tokens, ts, cond.embeds.to(x.device, dtype), mask, shapes)
        if w != 1.0 and cond.uncond is not None:
            unc = cond.uncond.to(x.device, dtype).expand(b, -1, -1)
            v_u = self._call(denoiser, tokens, ts, unc, None, shapes)
            guided = v_u + w * (v - v_u)
            v = guided * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        return unpack_latents(v, h, w_)

    def _stats(self, vae, x):
        c = vae.config
        view = (1, c.z_dim, 1, 1, 1)
        return (torch.tensor(c.latents_mean).view(view).to(x.device, x.dtype),
                torch.tensor(c.latents_std).view(view).to(x.device, x.dtype))

    def from_latents(self, vae, x):
        p = next(vae.parameters())
        z = x.unsqueeze(2).to(p.device, p.dtype)
        mean, std = self._stats(vae, z)
        return vae.decode(z * std + mean).sample[:, :, 0].float().clamp(-1, 1).cpu()

    def to_latents(self, vae, images):
        p = next(vae.parameters())
        latent = vae.encode(images.unsqueeze(2).to(p.device, p.dtype)).latent_dist.mean
        mean, std = self._stats(vae, latent)
        return ((latent - mean) / std)[:, :, 0].float().cpu()

    def pipeline_latents(self, x):
        return pack_latents(x)

    def from_pipeline_latents(self, latents, shape):
        return unpack_latents(latents, shape[1], shape[2])
