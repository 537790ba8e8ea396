"""SANA (``SanaPipeline``): Gemma-2 hidden states of the prompt (with the pipeline's complex human
instruction prepended and its token selection; the negative prompt without it), padded to
``max_sequence_length`` with an attention mask, the linear-attention transformer at timestep
1000 sigma x ``timestep_scale``, classifier-free guidance on one doubled batch (unconditional half
first), a learned-sigma half of the output dropped, the DC-AE decoded at latents / scaling_factor.

SANA checkpoints ship a ``DPMSolverMultistepScheduler`` with flow sigmas (``flow_shift``); pgraft's
samplers are Euler / Flow-GRPO's SDE, so the config is read as ``FlowMatchEulerDiscreteScheduler`` with
``shift = flow_shift`` (the same sigma grid; the multistep solver itself is not reproduced)."""

from __future__ import annotations

import inspect

import torch

from .base import FlowFamily, PromptEmbedding


def default_instruction() -> list[str] | None:
    """SanaPipeline.__call__'s default ``complex_human_instruction``."""
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaFamily(FlowFamily):
    name = "sana"
    pipeline_class = "SanaPipeline"
    transformer_class = "SanaTransformer2DModel"
    parts = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    default_guidance = 4.5
    masked = True
    max_sequence_length = 300

    def check_scheduler(self, pipe) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = pipe.scheduler.config
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            if config.get("prediction_type") != "flow_prediction":
                raise ValueError(f"SanaPipeline: scheduler {type(pipe.scheduler).__name__} is not flow-matching "
                                 "(prediction_type flow_prediction)")
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=float(config.get("flow_shift") or 1.0),
                                                             num_train_timesteps=config.num_train_timesteps)
        super().check_scheduler(pipe)

    def vae_scale_factor(self, pipe) -> int:
        return int(pipe.vae_scale_factor)

    def encode(self, pipe, prompts, max_sequence_length, device, instruction: list[str] | None = None):
        instruction = default_instruction() if instruction is None else instruction
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=max_sequence_length,
                                                complex_human_instruction=instruction or None)
        return [PromptEmbedding(e.cpu(), None, m.cpu()) for e, m in zip(embeds, mask)]

    def encode_negative(self, pipe, max_sequence_length, device) -> PromptEmbedding:
        """The empty negative prompt as ``encode_prompt`` encodes it (no instruction, no token selection)."""
        _, _, embeds, mask = pipe.encode_prompt([""], do_classifier_free_guidance=True, negative_prompt="",
                                                device=device, max_sequence_length=max_sequence_length,
                                                complex_human_instruction=None)
        return PromptEmbedding(embeds[0].cpu(), None, mask[0].cpu())

    def velocity(self, denoiser, x, t, cond, w):
        transformer = denoiser.transformer
        dtype = next(transformer.parameters()).dtype
        scale = float(getattr(transformer.config, "timestep_scale", 1.0) or 1.0)
        ts = (t.to(x.device, torch.float32) * denoiser.timestep_scale) * scale
        emb, mask = cond.embeds.to(x.device, dtype), cond.mask.to(x.device)
        h = x.to(dtype)
        if w == 1.0 or cond.uncond is None:
            v = transformer(h, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=ts).sample.float()
        else:
            unc = cond.uncond.to(x.device, dtype).expand_as(emb)
            unc_mask = cond.uncond_mask.to(x.device).expand_as(mask)
            v_u, v_c = transformer(torch.cat([h, h]), encoder_hidden_states=torch.cat([unc, emb]),
                                   encoder_attention_mask=torch.cat([unc_mask, mask]),
                                   timestep=torch.cat([ts, ts])).sample.float().chunk(2)
            v = v_u + w * (v_c - v_u)
        if transformer.config.out_channels // 2 == x.shape[1]:  # learned sigma: keep the velocity half
            v = v.chunk(2, dim=1)[0]
        return v

    def from_latents(self, vae, x):
        p = next(vae.parameters())
        return vae.decode((x / vae.config.scaling_factor).to(p.device, p.dtype)).sample.float().clamp(-1, 1).cpu()

    def to_latents(self, vae, images):
        p = next(vae.parameters())
        return (vae.encode(images.to(p.device, p.dtype)).latent.float() * vae.config.scaling_factor).cpu()
