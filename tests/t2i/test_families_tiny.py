"""Tiny random pipeline directories of the flow families FLUX.1, Qwen-Image and SANA, built from configs
the way diffusers' own pipeline tests build them (no downloads; tokenizers trained offline on the
prompts) and written with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch


def _bpe(texts: list[str], specials: list[str], cls):
    """A byte-level BPE fast tokenizer of class ``cls`` trained offline on ``texts`` (specials first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    return cls(tokenizer_object=tok)


def build_tiny_flux(directory: Path, texts: list[str], seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline directory: a 1+1-block FLUX transformer on 4x8x8 latents (packed to 16 tokens of 16),
    CLIP (pooled 32) + 1-layer T5 (32), a VAE to 16x16 images with FLUX's scaling/shift factors, the
    dynamic-shifting flow-matching Euler scheduler; ``guidance_embeds``: dev-style (True) or schnell."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    from pgraft.apps.t2i.model import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(texts, directory.parent / f"{directory.name}_clip_tokenizer")
    tok.model_max_length = 16
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, projection_dim=32))
    words = sorted({w for s in texts for w in s.lower().split()})
    tok2 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words],
                       extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok,
                 text_encoder_2=t5, tokenizer_2=tok2).save_pretrained(str(directory))
    return directory


def build_tiny_qwen(directory: Path, texts: list[str], seed: int = 0) -> Path:
    """A QwenImagePipeline directory: diffusers' test transformer (2 layers, 16 latent channels packed from
    4x8x8), a tiny Qwen2.5-VL text encoder (hidden 16) with an offline byte-level BPE tokenizer, the
    video VAE (4 latent channels, 32x32 images), Qwen's dynamic-shifting scheduler."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

    torch.manual_seed(seed)
    tokenizer = _bpe([*texts, "<|im_start|>system Describe the image by detailing the color, shape, size, texture, "
                      "quantity, text, spatial relationships of the objects and background:<|im_end|> <|im_start|>"
                      "user assistant"] * 3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], Qwen2TokenizerFast)
    tokenizer.pad_token = "<|endoftext|>"
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.8, 1.0, 1.2])
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer) + 8,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer) + 8, bos_token_id=None, eos_token_id=None, vision_end_token_id=len(tokenizer) + 1,
        vision_start_token_id=len(tokenizer) + 2, vision_token_id=len(tokenizer) + 3)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift=1.0,
                                                shift_terminal=0.02, time_shift_type="exponential")
    QwenImagePipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                      tokenizer=tokenizer).save_pretrained(str(directory))
    return directory


def build_tiny_sana(directory: Path, texts: list[str], seed: int = 0) -> Path:
    """A SanaPipeline directory: diffusers' test transformer (1 layer) on 4x16x16 latents, their tiny DC-AE
    (2 blocks: 2x down, so 32x32 images, SANA's smallest multiple of 32), a 1-layer Gemma-2 with an
    offline byte-level BPE tokenizer, SANA's DPM-Solver flow scheduler config (read as Euler, shift 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    from pgraft.apps.t2i.pipelines.sana import default_instruction

    torch.manual_seed(seed)
    tokenizer = _bpe([*texts, *default_instruction()], ["<pad>", "<eos>", "<bos>", "<unk>"], GemmaTokenizerFast)
    tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token = "<pad>", "<eos>", "<bos>"
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=16)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
                                            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
                                            max_position_embeddings=2048, attn_implementation="eager"))
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                 tokenizer=tokenizer).save_pretrained(str(directory))
    return directory
