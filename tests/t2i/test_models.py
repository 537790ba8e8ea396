"""Tokenizer, pipeline save/load, the SD (latent) path on a tiny random pipeline, LoRA round-trip."""

from __future__ import annotations

import pytest
import torch

from pgraft.apps.t2i.model import T2IPipeline, TableAlphaBar, build_world_pipeline, tokenize, train_tokenizer
from pgraft.apps.t2i.world import all_prompts

PROMPTS = [s.text() for s in all_prompts()]


def test_tokenizer_round_trip(tmp_path):
    tok = train_tokenizer(PROMPTS, tmp_path / "tok")
    for p in ["a photo of four diamonds", "a photo of a purple square right of a circle"]:
        ids = tok(p).input_ids
        assert ids[0] == 0 and ids[-1] == 1  # <|startoftext|> ... <|endoftext|>
        assert len(ids) == len(p.split()) + 2  # every grammar word is one token
        assert tok.decode(ids, skip_special_tokens=True).strip() == p
    assert tokenize(tok, ["a photo of a dog"], 16).shape == (1, 16)  # unknown words fall back to characters


def test_the_same_texts_give_the_same_token_ids(tmp_path):
    """The BPE trainer numbers its initial symbols in hash-set order; train_tokenizer renumbers them, so
    a pipeline built twice from one seed has one set of weights and one tokenizer (the same token ids)."""
    vocabs = [train_tokenizer(PROMPTS, tmp_path / f"tok{i}").get_vocab() for i in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    ids = sorted(vocabs[0].values())
    assert ids == list(range(len(ids))) and vocabs[0]["<|startoftext|>"] == 0 and vocabs[0]["<|endoftext|>"] == 1


def test_world_pipeline_save_load_sample(tmp_path):
    pipe = build_world_pipeline("tiny", PROMPTS, tmp_path / "tok", seed=0)
    pipe.save(tmp_path / "p")
    again = T2IPipeline.load(tmp_path / "p")
    assert again.state_shape == (12, 8, 8) and again.vae is None and again.info.patch_size == 2
    x = torch.randn(3, *again.state_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    cond_a, cond_b = pipe.prompt_encoder()(PROMPTS[:3]), again.prompt_encoder()(PROMPTS[:3])
    torch.testing.assert_close(pipe.denoiser(x, t, cond_a), again.denoiser(x, t, cond_b))
    images = again.decode(x)
    assert images.shape == (3, 3, 16, 16)
    torch.testing.assert_close(again.decode(again.encode_images(images)), images)  # exact space-to-depth


def test_v_prediction_output_is_converted_to_eps_and_survives_save_load(tmp_path):
    from pgraft.core.schedules import cosine_alpha_bar

    pipe = build_world_pipeline("tiny", PROMPTS, tmp_path / "tok", seed=0, prediction_type="v_prediction")
    cond = pipe.prompt_encoder()(PROMPTS[:3], guidance=False)
    x, t = torch.randn(3, *pipe.state_shape), torch.tensor([0.05, 0.5, 1.0])
    with torch.no_grad():
        v = pipe.denoiser.unet(x, pipe.denoiser.timesteps(t), encoder_hidden_states=cond.embeds).sample
        eps = pipe.denoiser(x, t, cond)
    a = cosine_alpha_bar(t.double()).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * x)
    # x0_hat = (x - sqrt(1-a) eps) / sqrt(a) = sqrt(a) x - sqrt(1-a) v: finite even at abar(1) ~ 1e-5
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(x0, a.sqrt() * x - (1 - a).sqrt() * v, atol=1e-3, rtol=1e-3)
    pipe.save(tmp_path / "p")
    again = T2IPipeline.load(tmp_path / "p")
    assert again.denoiser.prediction_type == "v_prediction" and again.denoiser.loss_weighting == "v"
    torch.testing.assert_close(again.denoiser(x, t, again.prompt_encoder()(PROMPTS[:3], guidance=False)), eps)


def test_guidance_is_the_cfg_combination(tmp_path):
    pipe = build_world_pipeline("tiny", PROMPTS, tmp_path / "tok", seed=0)
    cond = pipe.prompt_encoder()(PROMPTS[:2])
    x, t = torch.randn(2, *pipe.state_shape), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        eps_c = pipe.denoiser(x, t, cond, guidance_scale=1.0)
        uncond = type(cond)(cond.prompts, cond.uncond.expand_as(cond.embeds))
        eps_u = pipe.denoiser(x, t, uncond, guidance_scale=1.0)
        torch.testing.assert_close(pipe.denoiser(x, t, cond, guidance_scale=3.0), eps_u + 3.0 * (eps_c - eps_u),
                                   atol=1e-5, rtol=1e-4)


def test_table_alpha_bar_hits_discrete_steps():
    table = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64).cumprod(0).clamp_min(1e-4)
    ab = TableAlphaBar(table)
    k = torch.tensor([1, 10, 500, 1000])
    torch.testing.assert_close(ab(k / 1000.0), table[k - 1])
    assert float(ab(0.0)) == 1.0
    assert torch.all(torch.diff(ab(torch.linspace(0, 1, 101))) <= 0)


def test_missing_and_non_diffusers_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T2IPipeline.load(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a diffusers text-to-image pipeline directory: missing unet/"):
        T2IPipeline.load(tmp_path / "junk")


def test_tiny_sd_pipeline_loads_in_latent_space(tiny_sd):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = tiny_sd
    pipe = T2IPipeline.load(path)
    assert pipe.vae is not None and pipe.state_shape == (4, 8, 8) and pipe.info.image_size == 16
    sched = DDIMScheduler.from_pretrained(path / "scheduler")
    # grid point k/N feeds the UNet timestep k-1 and uses alphas_cumprod[k-1]
    t = torch.tensor([1.0, 0.5, 0.001])
    torch.testing.assert_close(pipe.denoiser.timesteps(t), torch.tensor([999.0, 499.0, 0.0]))
    torch.testing.assert_close(pipe.alpha_bar(t.double()), sched.alphas_cumprod[[999, 499, 0]].double())
    x = torch.randn(2, 4, 8, 8)
    assert pipe.decode(x).shape == (2, 3, 16, 16)
    # the directory is a genuine diffusers pipeline
    sd = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    assert sd.unet.config.in_channels == 4
