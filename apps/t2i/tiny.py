"""Tiny random StableDiffusion3Pipeline directories built from configs (no downloads), as diffusers'
own tests build theirs: what the SD3 path is tested and benchmarked on where no real weights exist
(the tests under ``tests/t2i`` and ``benchmarks/t2i_sd3.py``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def build_tiny_sd3(directory: Path, texts: list[str], seed: int = 0, t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline directory as ``save_pretrained`` writes it: a 2-block SD3 transformer on
    4x8x8 latents, two CLIP-with-projection encoders (pooled 16 + 16 = 32) whose BPE tokenizers are
    trained on ``texts``, optionally a 1-layer T5 over the words of ``texts`` (``t5=False``:
    text_encoder_3 / tokenizer_3 absent), a VAE to 16x16 images with SD3's scaling/shift factors and
    the shift-3 flow-matching Euler scheduler. Every weight is drawn from ``seed``: the same arguments
    give the same weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    from .model import train_tokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizers, encoders = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for i in (1, 2):
            tok = train_tokenizer(texts, Path(scratch) / f"tokenizer_{i}")
            tok.model_max_length = 16
            tokenizers.append(tok)
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
        tok3 = enc3 = None
        if t5:
            words = sorted({w for s in texts for w in s.lower().split()})
            tok3 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words],
                               extra_ids=0)
            enc3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2))
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
        StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                 text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1],
                                 tokenizer_2=tokenizers[1], text_encoder_3=enc3,
                                 tokenizer_3=tok3).save_pretrained(str(directory))
    return directory


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A known image reward for benchmarks on tiny random pipelines, whose images depict nothing:
    the red channel's mean minus the mean of the green and blue ones, per image ([B, 3, H, W] in
    [-1, 1] -> [B] in [-2, 2]); the prompts are ignored. As a ``--reward``:
    ``pgraft.apps.t2i.tiny:redness``."""
    means = images.float().mean(dim=(2, 3))
    return means[:, 0] - 0.5 * (means[:, 1] + means[:, 2])
