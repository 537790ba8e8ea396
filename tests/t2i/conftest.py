"""Fixtures for the t2i tests, all random-weight and built from configs (no downloads): a tiny Stable
Diffusion pipeline directory, a tiny BLIP image-text-retrieval model and a tiny LLaVA (reward plug-ins)."""

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


def _byte_bpe_tokenizer(texts, specials):
    """A byte-level BPE fast tokenizer (as GPT-2 / Llama 3: " Yes" and "Yes" are different tokens)
    trained offline on ``texts``, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval, BlipProcessor
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    from pgraft.apps.t2i.world import all_prompts

    d = tmp_path_factory.mktemp("blip")
    words = sorted({w for s in all_prompts() for w in s.text().lower().split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    # vocab= (transformers 5 ignores vocab_file= here and would map every word to [UNK])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(tokens)})
    assert tok.convert_tokens_to_ids(words[0]) == 5, "the tiny tokenizer lost its vocabulary"
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tok).save_pretrained(d)
    cfg = BlipConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=32,
                                      pad_token_id=0, sep_token_id=3, bos_token_id=2),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=16, patch_size=8), projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(0)
    BlipForImageTextRetrieval(cfg).save_pretrained(d)
    return d


LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                  "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    from pgraft.apps.t2i.rewards import VQAScoreReward
    from pgraft.apps.t2i.world import all_prompts

    d = tmp_path_factory.mktemp("llava")
    texts = [VQAScoreReward.QUESTION.format(s.text()) for s in all_prompts()] + ["USER: ASSISTANT: Yes", "Yes No"] * 20
    tok = _byte_bpe_tokenizer(texts, ["<unk>", "<pad>", "<s>", "</s>", "<image>"])
    tok.add_special_tokens({"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE).save_pretrained(d)
    cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=1),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    """Three prompts of the world grammar (the checker reward scores them): a run embeds only these
    (the tiny-family tests)."""
    from pgraft.apps.t2i.prompts import load_prompts

    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(load_prompts("heldout").prompts[:3]) + "\n")
    return path
