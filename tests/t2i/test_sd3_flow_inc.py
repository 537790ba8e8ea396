"""Inverse noise correction of a flow-matching (SD3) pipeline at latent resolution (issue 19, item 2), on a tiny
random StableDiffusion3Pipeline and fabricated images (no downloads, no real weights): the inversion through the
discrete Euler sampler recovers an Euler sample's starting noise (and a wrong grid does not), `invert` resumes
shard by shard, `correct` + `sample-corrected` compose corrector -> frozen base with the FLOPs counted, and a
non-flow --model is refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import invoke, ok
from PIL import Image
from test_sd3_flow import build_tiny_sd3  # the tiny StableDiffusion3Pipeline directory writer

from pgraft.apps.t2i.flow_inc import (
    NOISE_MODELS,
    Guided,
    InvertConfig,
    LatentNoiseFlow,
    empty_prompt_cond,
    invert_images,
    invert_latents,
    load_flow_pipeline,
    read_captions,
)
from pgraft.core.errors import UsageError
from pgraft.core.inversion import count_flops, read_shards, sample_noise_corrected
from pgraft.core.noise_correction import load_correction
from pgraft.core.sampling import euler_step, sample
from pgraft.core.schedules import flow_times
from pgraft.core.state import load_state, save_state


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    from pgraft.apps.t2i.world import all_prompts

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3inc") / "sd3", [s.text() for s in all_prompts()], t5=False)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Five fabricated PNG/JPG images (coloured squares on noise), some not 16x16 or not square."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(16, 16), (20, 24), (16, 16), (32, 32), (18, 16)]):
        arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(80, 255, 3, dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img_{i}.{'jpg' if i == 3 else 'png'}")
    return d


# ----------------------------------------------------------------------------- (a) inversion round trip
def test_sd3_inversion_recovers_the_starting_noise_of_an_euler_sample(sd3):
    """A sample drawn by the pipeline's deterministic Euler sampler (its shifted sigma grid, empty prompt,
    guidance 1) inverts back to its starting latent noise; the same inversion on the unshifted grid, or on the
    grid walked the wrong way, misses by orders of magnitude more than the tolerance."""
    pipe = load_flow_pipeline(sd3)
    model = Guided(pipe.denoiser, 1.0)
    times = pipe.times(4)
    assert times[0] == 1 and times[-1] == 0 and not torch.allclose(times, flow_times(4))  # shift 3: not uniform
    z = torch.randn(3, *pipe.state_shape, generator=torch.Generator().manual_seed(0))
    cond = empty_prompt_cond(pipe, 3)
    x0 = sample(model, z, times, euler_step, cond)
    assert (x0 - z).abs().max() > 0.5  # the sampler moved far from its noise
    res, recon = invert_latents(model, x0, times, cond, max_iter=50, tol=1e-6)
    assert (res.noise - z).abs().max() < 1e-4 and recon.max() < 1e-4 and res.residual.max() < 1e-5
    tol = 1e-4
    wrong_grid, _ = invert_latents(model, x0, flow_times(4), cond, max_iter=50, tol=1e-6)
    assert (wrong_grid.noise - z).abs().max() > 100 * tol
    wrong_sign, _ = invert_latents(model, x0, times.flip(0), cond, max_iter=50, tol=1e-6)
    assert (wrong_sign.noise - z).abs().max() > 100 * tol


def test_sd3_inversion_splits_the_prompts_with_the_samples(sd3):
    """Per-sample inversion under captions: each image's prompt follows it when converged images leave
    the batch (PromptBatch.take_samples), so a captioned image inverts to the same noise alone as in a
    batch, and the noise is the one its own caption's sampler started from."""
    pipe = load_flow_pipeline(sd3)
    model = Guided(pipe.denoiser, 1.0)
    times = pipe.times(3)
    prompts = ["a red square", "a blue circle", "a green triangle"]
    cond = pipe.prompt_encoder()(prompts, guidance=False)
    part = cond.take_samples(torch.tensor([2, 0]))
    assert part.prompts == ["a green triangle", "a red square"] and torch.equal(part.embeds, cond.embeds[[2, 0]])
    assert torch.equal(part.pooled, cond.pooled[[2, 0]])
    z = torch.randn(3, *pipe.state_shape, generator=torch.Generator().manual_seed(2))
    x0 = sample(model, z, times, euler_step, cond)
    res, _ = invert_latents(model, x0, times, cond, max_iter=50, tol=1e-6)
    assert (res.noise - z).abs().max() < 1e-4
    for i in range(3):
        alone, _ = invert_latents(model, x0[i:i + 1], times, cond.take_samples(torch.tensor([i])), max_iter=50, tol=1e-6)
        torch.testing.assert_close(alone.noise, res.noise[i:i + 1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- (b) resume
def test_sd3_invert_resumes_finished_shards_and_refuses_other_settings(sd3, image_folder, tmp_path):
    captions = tmp_path / "captions.jsonl"
    names = sorted(p.name for p in image_folder.iterdir())
    captions.write_text("".join(json.dumps({"file": n, "caption": f"a photo of {n}"}) + "\n" for n in names[::-1]))
    cfg = InvertConfig(steps=3, shard_size=2, batch_size=2)
    whole = invert_images(sd3, image_folder, tmp_path / "whole", cfg, captions=captions, show_progress=False)
    assert (whole.n_images, whole.shards, whole.shards_computed) == (5, 3, 3)
    assert whole.max_residual < 1e-3 and whole.recon_max_abs < 1e-3

    class Killed(Exception):
        pass

    def kill_after_first(i):
        if i == 0:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        invert_images(sd3, image_folder, out, cfg, captions=captions, show_progress=False, on_shard=kill_after_first)
    first = out / "shards" / "noise_00000.safetensors"
    stamp = os.stat(first).st_mtime_ns
    again = invert_images(sd3, image_folder, out, cfg, captions=captions, show_progress=False)
    assert again.shards_computed == 2 and os.stat(first).st_mtime_ns == stamp  # shard 0 was not recomputed
    assert invert_images(sd3, image_folder, out, cfg, captions=captions, show_progress=False).shards_computed == 0
    a, b = read_shards(tmp_path / "whole"), read_shards(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["noise"].shape == (5, 4, 8, 8) and torch.equal(a["index"], torch.arange(5))
    meta = json.loads((out / "invert.json").read_text())
    assert meta["names"] == names and meta["texts"] == [f"a photo of {n}" for n in names]
    # another step count (or the empty prompt instead of the captions) would mix noises of two samplers
    with pytest.raises(UsageError, match="steps|times"):
        invert_images(sd3, image_folder, out, InvertConfig(steps=4, shard_size=2, batch_size=2), captions=captions,
                      show_progress=False)
    with pytest.raises(UsageError, match="captions"):
        invert_images(sd3, image_folder, out, cfg, show_progress=False)


def test_sd3_captions_files_in_three_formats(tmp_path):
    names = ["a.png", "b.png"]
    (tmp_path / "c.txt").write_text("first\nsecond\n")
    (tmp_path / "c.csv").write_text("file,caption\nb.png,second\na.png,first\n")
    (tmp_path / "c.jsonl").write_text('{"file": "b.png", "caption": "second"}\n{"file": "a.png", "caption": "first"}\n')
    for suffix in ("txt", "csv", "jsonl"):
        assert read_captions(tmp_path / f"c.{suffix}", names) == ["first", "second"]
    with pytest.raises(UsageError, match="no caption"):
        read_captions(tmp_path / "c.csv", names + ["c.png"])
    with pytest.raises(UsageError, match="2 captions for 3 images"):
        read_captions(tmp_path / "c.txt", names + ["c.png"])


# ----------------------------------------------------------------------------- (c) correct + sample
def test_sd3_correct_then_sample_corrected_counts_the_corrector_flops(sd3, tmp_path):
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    save_state(images, tmp_path / "images.safetensors")
    inv, cor, out = tmp_path / "invert", tmp_path / "correct", tmp_path / "samples"
    ok("t2i", "invert", str(tmp_path / "images.safetensors"), "--model", str(sd3), "--out", str(inv), "--steps", "3",
       "--shard-size", "2", "--batch-size", "2", "--device", "cpu", "--quiet")
    output = ok("t2i", "correct", str(inv), "--out", str(cor), "--preset", "tiny", "--train-steps", "3",
                "--batch-size", "4", "--device", "cpu", "--quiet")
    meta = json.loads((cor / "correct.json").read_text())
    pipe = load_flow_pipeline(sd3, guidance_scale=2.0)
    correction = load_correction(cor, NOISE_MODELS)
    assert isinstance(correction.noise_model, LatentNoiseFlow) and correction.base_steps == 3
    assert meta["parameters"] == sum(p.numel() for p in correction.noise_model.parameters())
    assert meta["transformer_parameters"] == sum(p.numel() for p in pipe.denoiser.transformer.parameters())
    assert f"{meta['parameters']:,} parameters" in output and meta["conditioning"] == "empty prompt"

    prompt = "a photo of a red circle"
    output = ok("t2i", "sample-corrected", "--noise-model", str(cor), "--prompt", prompt, "--per-prompt", "2",
                "--noise-steps", "2", "--guidance", "2", "--out", str(out), "--seed", "5", "--device", "cpu", "--quiet")
    got = load_state(out / "images.safetensors")
    assert got.shape == (2, 3, 16, 16) and got.min() >= -1 and got.max() <= 1 and (out / "grid.png").is_file()
    # the corrected sampler is z -> corrector (2 uniform Euler steps) -> base (3 steps, CFG 2 on the prompt) -> decode
    z = torch.randn(2, *pipe.state_shape, generator=torch.Generator().manual_seed(5))
    cond = pipe.prompt_encoder()([prompt] * 2)
    base = Guided(pipe.denoiser, 2.0)
    want = pipe.decode(sample_noise_corrected(correction.noise_model, base, z, flow_times(2), pipe.times(3),
                                              cond=cond))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # FLOPs per image: 3 guided transformer calls (the doubled CFG batch) + 2 corrector calls, each counted
    flops = json.loads((out / "flops.json").read_text())
    one = pipe.prompt_encoder()([prompt])
    t1, x1 = torch.ones(1), z[:1]
    guided_call = count_flops(lambda: base(x1, t1, one))
    assert guided_call > 1.5 * count_flops(lambda: Guided(pipe.denoiser, 1.0)(x1, t1, one))  # CFG doubles the batch
    corrector_call = count_flops(lambda: correction.noise_model(x1, t1, None))
    assert (flops["base_calls"], flops["noise_calls"]) == (3, 2)
    assert flops["base"] == 3 * guided_call and flops["noise"] == 2 * corrector_call > 0
    assert flops["corrected"] - flops["base"] == flops["noise"] and flops["ratio"] > 1
    assert f"x{flops['ratio']:.3f}" in output
    # --noise-steps 0 is the base alone, at the base's FLOPs
    ok("t2i", "sample-corrected", "--noise-model", str(cor), "--prompt", prompt, "--per-prompt", "2",
       "--noise-steps", "0", "--guidance", "2", "--out", str(tmp_path / "plain"), "--seed", "5", "--device", "cpu",
       "--quiet")
    plain = json.loads((tmp_path / "plain" / "flops.json").read_text())
    assert plain["corrected"] == plain["base"] == flops["base"] and plain["noise"] == 0
    torch.testing.assert_close(load_state(tmp_path / "plain" / "images.safetensors"),
                               pipe.decode(sample(base, z, pipe.times(3), euler_step, cond)), atol=1e-5, rtol=1e-5)
    # a rerun resumes these weights: more steps may follow, another seed may not
    ok("t2i", "correct", str(inv), "--out", str(cor), "--preset", "tiny", "--train-steps", "4", "--batch-size", "4",
       "--device", "cpu", "--quiet")
    result, output = invoke("t2i", "correct", str(inv), "--out", str(cor), "--preset", "tiny", "--train-steps", "4",
                            "--batch-size", "4", "--seed", "1", "--device", "cpu", "--quiet")
    assert result.exit_code != 0 and "other settings or noises (seed 0 -> 1)" in output, output


# ----------------------------------------------------------------------------- (d) refusals
def test_sd3_inc_refuses_a_non_flow_model_in_one_line(tiny_sd, image_folder, tmp_path):
    out = tmp_path / "invert"
    for model, words in [(tiny_sd, "is a UNet / DDIM Stable Diffusion pipeline, not a flow-matching pipeline "
                                   "directory (StableDiffusion3Pipeline, FluxPipeline"),
                         (tmp_path / "missing", "does not exist")]:
        result, output = invoke("t2i", "invert", str(image_folder), "--model", str(model), "--out", str(out), "--quiet")
        lines = [line for line in result.output.splitlines() if words in line]
        assert result.exit_code == 2 and len(lines) == 1 and str(model) in lines[0], result.output
        assert "Traceback" not in output and not out.exists()
    result, output = invoke("t2i", "correct", str(image_folder), "--out", str(out), "--quiet")
    assert result.exit_code == 2 and "is not a `pgraft t2i invert` directory" in output and "Traceback" not in output
    result, output = invoke("t2i", "sample-corrected", "--noise-model", str(image_folder), "--quiet")
    assert result.exit_code == 2 and "holds no trained noise corrector" in output
