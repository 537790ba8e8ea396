"""Fixtures for the t2i tests: a tiny random-weight Stable Diffusion pipeline directory built from
configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def build_tiny_sd(directory: Path, prompts: list[str], seed: int = 0) -> Path:
    """unet/ (4x8x8 latents), vae/ (16x16 images), text_encoder/, tokenizer/, scheduler/ (SD's
    scaled-linear DDIM config) and model_index.json, as StableDiffusionPipeline.save_pretrained writes."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pgraft.apps.t2i.model import train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(prompts, directory / "tokenizer")
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(directory / "unet")
    vae.save_pretrained(directory / "vae")
    text.save_pretrained(directory / "text_encoder")
    sched.save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return directory


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from pgraft.apps.t2i.world import all_prompts

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "sd", [s.text() for s in all_prompts()])
