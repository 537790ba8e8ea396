"""The flow-matching pipeline families FLUX.1, Qwen-Image and SANA (beside SD3, tests/t2i/test_sd3_flow.py) on
tiny random pipelines built from configs (tests/t2i/test_families_tiny.py; no downloads): the family is read from
model_index.json, each adapter's sampler reproduces the diffusers pipeline's own output from the same latents,
GRAFT / P-GRAFT / policy-gradient rounds run and resume through the t2i train entry points, and the LoRA pgraft
writes loads with the pipeline's own ``load_lora_weights`` and changes the transformer's output identically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_families_tiny import build_tiny_flux, build_tiny_qwen, build_tiny_sana
from two_processes import assert_two_processes_accept_alike

from pgraft.apps.t2i.flow_pipeline import FlowDenoiser, FlowT2IPipeline, pipeline_kind
from pgraft.apps.t2i.pipelines import FAMILIES, supported_classes
from pgraft.apps.t2i.train import T2IConfig, load_head, load_pipeline, make_problem, train_t2i, train_t2i_pg
from pgraft.core.grs import GRSConfig
from pgraft.core.sampling import sample_split
from pgraft.core.trainer import GraftConfig

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]
# the image size each tiny family is sampled at (None: the transformer's sample_size)
SIZES = {"flux": 16, "flux_schnell": 16, "qwen": 32, "sana": None}


@pytest.fixture(scope="module")
def world_texts() -> list[str]:
    from pgraft.apps.t2i.world import all_prompts

    return [s.text() for s in all_prompts()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, world_texts):
    """Family name -> a tiny pipeline directory, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            if name == "flux":
                built[name] = build_tiny_flux(root / "flux", world_texts)
            elif name == "flux_schnell":
                built[name] = build_tiny_flux(root / "flux_schnell", world_texts, seed=1, guidance_embeds=False)
            elif name == "qwen":
                built[name] = build_tiny_qwen(root / "qwen", world_texts)
            else:
                built[name] = build_tiny_sana(root / "sana", world_texts)
        return built[name]

    return get


def _graft(**kw) -> GraftConfig:
    base = dict(rounds=1, groups=2, group_size=2, grs=GRSConfig(rule="topk", k=1), split=0.0, train_steps=2,
                batch_size=2, lr=1e-2, lora_rank=2, sample_batch_size=4, seed=0, final_eval=False)
    return GraftConfig(**{**base, **kw})


def _app(directory: Path, name: str, prompts: Path, **kw) -> T2IConfig:
    base = dict(model=str(directory), prompts=str(prompts), reward="checker", reward_weights=None, n_steps=3,
                image_size=SIZES[name])
    return T2IConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name,kind", [("flux", "flux"), ("qwen", "qwen_image"), ("sana", "sana")])
def test_flux_qwen_sana_kind_is_read_from_model_index(name, kind, tiny, tmp_path):
    directory = tiny(name)
    assert pipeline_kind(directory) == kind
    pipe = load_pipeline(directory, image_size=SIZES[name])
    assert isinstance(pipe, FlowT2IPipeline) and pipe.kind == kind and pipe.denoiser.family == kind
    assert type(pipe.sd3).__name__ == FAMILIES[kind].pipeline_class
    # an unsupported class is refused in one line naming it and the supported ones
    other = tmp_path / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline") as err:
        pipeline_kind(other)
    assert "\n" not in str(err.value) and all(c in str(err.value) for c in supported_classes())
    assert FAMILIES[kind].pipeline_class in supported_classes()


# ----------------------------------------------------------------------------- sampler vs diffusers
def _reference_call(name: str, pipe: FlowT2IPipeline, guidance: float) -> dict:
    """The diffusers __call__ kwargs that mean what our sampler does for this family."""
    size = pipe.info.image_size
    common = dict(height=size, width=size, max_sequence_length=pipe.info.max_sequence_length)
    if name.startswith("flux"):
        return {**common, "guidance_scale": 3.5}  # the guidance embedding (dev); no CFG
    if name == "qwen":
        return {**common, "true_cfg_scale": guidance, "negative_prompt": ""}
    return {**common, "guidance_scale": guidance, "use_resolution_binning": False}


@pytest.mark.parametrize("name", ["flux", "flux_schnell", "qwen", pytest.param("sana", marks=pytest.mark.slow)])
def test_flux_qwen_sana_sampler_matches_the_diffusers_pipeline(name, tiny):
    """Our Euler sampler (eta 0) through the family adapter reproduces the family pipeline's own __call__ from
    the same latents (output_type="latent", packed/unpacked as the family does) and decoded images, on the grid
    diffusers steps on. Tolerance 1e-5 (float32, same operations in the same order)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    guidance = 3.0
    pipe = load_pipeline(tiny(name), guidance_scale=None if name.startswith("flux") else guidance,
                         image_size=SIZES[name])
    problem = make_problem(pipe, PROMPTS, None, 4, None)
    x_T = problem.prior(3, torch.Generator().manual_seed(5))
    cond = problem.cond_batch(torch.arange(3))
    ours = sample_split(pipe.denoiser, pipe.denoiser, x_T, problem.times, len(problem.times) - 1, problem.step, cond)
    ref = type(pipe.sd3).from_pretrained(str(tiny(name)))
    if name == "sana":  # SANA ships a DPM-Solver flow config; ours runs Euler on its sigmas (see pipelines/sana.py)
        ref.scheduler = FlowMatchEulerDiscreteScheduler(shift=ref.scheduler.config.flow_shift)
    fam, kwargs = pipe.family, _reference_call(name, pipe, guidance)
    with torch.no_grad():
        latents = ref(PROMPTS, num_inference_steps=4, latents=fam.pipeline_latents(x_T.clone()), output_type="latent",
                      **kwargs).images
        images = ref(PROMPTS, num_inference_steps=4, latents=fam.pipeline_latents(x_T.clone()), output_type="pt",
                     **kwargs).images
    torch.testing.assert_close(ours.x_0, fam.from_pipeline_latents(latents, pipe.state_shape), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((pipe.decode(ours.x_0, chunk=2) + 1) / 2, images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(problem.times.float(), ref.scheduler.sigmas)
    assert not torch.allclose(ours.x_0, x_T)


def test_flux_guidance_embedding_dev_only_and_no_cfg_by_default(tiny):
    """FLUX.1-dev conditions on the guidance embedding (changing it changes v), schnell has none; neither runs
    classifier-free guidance by default (no unconditional batch)."""
    dev = load_pipeline(tiny("flux"), image_size=16)
    schnell = load_pipeline(tiny("flux_schnell"), image_size=16)
    assert dev.denoiser.guidance_scale == schnell.denoiser.guidance_scale == 1.0
    cond = dev.prompt_encoder()(PROMPTS[:2], guidance=dev.denoiser.guidance_scale != 1.0)
    assert cond.uncond is None
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v = dev.denoiser(x, t, cond)
        dev.denoiser.embedded_guidance = 7.0
        assert not torch.allclose(dev.denoiser(x, t, cond), v, atol=1e-5)
    assert dev.sd3.transformer.config.guidance_embeds and not schnell.sd3.transformer.config.guidance_embeds


# ----------------------------------------------------------------------------- rounds, resume, LoRA
def _lora_matches_diffusers(name: str, directory: Path, run: Path, guidance: float | None) -> None:
    """The run's lora/ loaded by the family pipeline's load_lora_weights gives the head's velocity."""
    pipe = load_pipeline(directory, guidance_scale=guidance, image_size=SIZES[name])
    head = load_head(run, pipe.denoiser)
    cond = pipe.prompt_encoder()(PROMPTS[:2], guidance=False)
    shape = pipe.state_shape
    x, t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.4])
    ref = type(pipe.sd3).from_pretrained(str(directory))
    with torch.no_grad():
        base_v, head_v = pipe.denoiser(x, t, cond), head(x, t, cond)
        assert not torch.allclose(head_v, base_v, atol=1e-4)
        ref.load_lora_weights(str(run / "lora"))
        assert any("lora" in n for n, _ in ref.transformer.named_parameters())
        loaded = FlowDenoiser.from_transformer(ref.transformer, pipe.info.num_train_timesteps, family=pipe.kind)
        torch.testing.assert_close(loaded(x, t, cond), head_v, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "qwen", "sana"])
def test_flux_qwen_sana_graft_pgraft_rounds_resume_and_lora_loads_with_diffusers(name, tiny, prompt_file, tmp_path):
    """P-GRAFT (split 0.5) through train_t2i: one round, then --resume to two (the first round's row kept, one
    new row); the exported LoRA targets the transformer attention and loads with the pipeline's
    load_lora_weights to the head's velocity. GRAFT (split 0) runs on the same family."""
    directory = tiny(name)
    guidance = None if name == "flux" else 2.0
    run = tmp_path / "pgraft"
    app = _app(directory, name, prompt_file, guidance_scale=guidance)
    _, first = train_t2i(app, _graft(split=0.5), run, show_progress=False)
    assert first["round"].tolist() == [0] and math.isfinite(first["train_loss"].iloc[0])
    _, both = train_t2i(app, _graft(split=0.5, rounds=2), run, resume=True, show_progress=False)
    assert both["round"].tolist() == [0, 1] and both["train_loss"].notna().all()
    pd.testing.assert_series_equal(both.iloc[0][["reward_mean", "train_loss"]], first.iloc[0][["reward_mean", "train_loss"]])
    config = json.loads((run / "config.json").read_text())
    assert config["graft"]["lora_targets"] == list(FAMILIES[load_pipeline(directory, image_size=SIZES[name]).kind].lora_targets)
    assert config["model"].get("family") == pipeline_kind(directory)
    _lora_matches_diffusers(name, directory, run, guidance)
    _, graft = train_t2i(app, _graft(split=0.0), tmp_path / "graft", show_progress=False)
    assert math.isfinite(graft["train_loss"].iloc[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "qwen", "sana"])
def test_flux_qwen_sana_two_processes_accept_the_same_set_as_one(name, tiny, tmp_path):
    """The 2-process equality of SD3 (tests/t2i/test_sd3_flow.py) for each new flow family."""
    size = ("--image-size", str(SIZES[name])) if SIZES[name] else ()
    assert_two_processes_accept_alike(tiny(name), tmp_path, size, n_steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "qwen", "sana"])
def test_flux_qwen_sana_policy_gradient_rounds_resume_with_first_ratio_one(name, tiny, prompt_file, tmp_path):
    """Flow-GRPO's SDE policy gradient (train_t2i_pg): finite loss and approx_kl, the first inner step's ratio 1
    within the fp32 tolerance (the core logs it, the app checks it), resume to a second round, LoRA exported."""
    from pgraft.core.policy_gradient import PGConfig

    directory = tiny(name)
    (tmp_path / "brightness.py").write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    app = _app(directory, name, prompt_file, guidance_scale=None if name == "flux" else 2.0, n_steps=2,
               reward=str(tmp_path / "brightness.py") + ":score")  # distinct rewards: non-zero advantages
    cfg = PGConfig(rounds=1, groups=2, group_size=2, batch_size=4, lr=1e-2, clip=0.2, lora_rank=2,
                   sample_batch_size=4, final_eval=False, seed=0)
    _, first = train_t2i_pg(app, cfg, tmp_path / "pg", show_progress=False)
    from dataclasses import replace

    _, both = train_t2i_pg(app, replace(cfg, rounds=2), tmp_path / "pg", resume=True, show_progress=False)
    assert both["round"].tolist() == [0, 1]
    assert both["approx_kl"].map(math.isfinite).all() and both["train_loss"].map(math.isfinite).all()
    assert (both["first_ratio_error"] <= 1e-4).all()
    assert json.loads((tmp_path / "pg" / "config.json").read_text())["app"]["t2i"]["eta"] == 0.7
    assert (tmp_path / "pg" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    from pgraft.core.rundir import RunDir

    _, weights, _ = RunDir(tmp_path / "pg", resume=True).load_checkpoint()
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # the policy moved off the base (B starts at 0)


# ----------------------------------------------------------------------------- inverse noise correction
def test_flux_inc_round_trip_through_flow_inc(tiny):
    """Inverse noise correction's public functions drive a FLUX pipeline through the same FlowT2IPipeline API:
    latents sampled from noise z with the empty prompt invert (flow_inc.invert_latents, Euler fixed point) back
    to z, and sample_corrected without a corrector is the plain sampler, decoded."""
    from pgraft.apps.t2i.flow_inc import empty_prompt_cond, invert_latents, sample_corrected
    from pgraft.core.sampling import euler_step

    pipe = load_pipeline(tiny("flux"), image_size=16)
    times = pipe.times(4)
    cond = empty_prompt_cond(pipe, 2)
    z = torch.randn(2, *pipe.state_shape, generator=torch.Generator().manual_seed(3))
    latents = sample_split(pipe.denoiser, pipe.denoiser, z, times, len(times) - 1, euler_step, cond).x_0
    res, recon = invert_latents(pipe.denoiser, latents, times, cond, max_iter=50, tol=1e-6)
    assert float(recon.max()) < 1e-4
    torch.testing.assert_close(res.noise, z, atol=1e-3, rtol=1e-3)
    out = sample_corrected(pipe, None, ["", ""], 4, 0, seed=0, show_progress=False, device="cpu")
    z0 = torch.randn((2, *pipe.state_shape), generator=torch.Generator().manual_seed(0))
    plain = sample_split(pipe.denoiser, pipe.denoiser, z0, times, len(times) - 1, euler_step, cond).x_0
    torch.testing.assert_close(out.images, pipe.decode(plain), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_flux_inc_cli_invert_correct_sample_corrected(tiny, tmp_path):
    """`pgraft t2i invert / correct / sample-corrected` on a tiny FLUX pipeline (a flow family beside SD3): the
    inversion records how far its noises map from the images' latents through FLUX's Euler grid, the corrector records
    FLUX's transformer size, and the corrected samples are corrector -> frozen FLUX base -> decode exactly."""
    from clitools import ok

    from pgraft.apps.t2i.flow_inc import NOISE_MODELS, Guided, ImageSource, empty_prompt_cond, load_flow_pipeline
    from pgraft.core.inversion import read_shards, sample_noise_corrected
    from pgraft.core.noise_correction import load_correction
    from pgraft.core.sampling import euler_step, sample
    from pgraft.core.schedules import flow_times
    from pgraft.core.state import load_state, save_state

    flux = tiny("flux")
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    save_state(images, tmp_path / "images.safetensors")
    inv, cor, out = tmp_path / "invert", tmp_path / "correct", tmp_path / "samples"
    ok("t2i", "invert", str(tmp_path / "images.safetensors"), "--model", str(flux), "--out", str(inv), "--steps", "3",
       "--shard-size", "2", "--batch-size", "2", "--device", "cpu", "--quiet")
    pipe = load_flow_pipeline(flux)
    meta = json.loads((inv / "invert.json").read_text())
    assert meta["latent_shape"] == list(pipe.state_shape) and meta["times"] == pipe.times(3).tolist()
    source = ImageSource(tmp_path / "images.safetensors", pipe.info.image_size)  # resized as `invert` resizes them
    shards, latents = read_shards(inv), pipe.encode_images(source.load(range(4)))
    back = sample(Guided(pipe.denoiser, 1.0), shards["noise"], pipe.times(3), euler_step, empty_prompt_cond(pipe, 4))
    # the recorded reconstruction error is max |Phi(noise) - latent| through FLUX's own grid (3 steps of a random
    # FLUX at 256 px leave it large; the fixed point converges at ~12 steps, test_flux_inc_round_trip_through_flow_inc
    # checks the inversion itself at 16 px)
    torch.testing.assert_close(shards["recon_max"], (back - latents).flatten(1).abs().amax(1), atol=1e-4, rtol=1e-4)

    output = ok("t2i", "correct", str(inv), "--out", str(cor), "--preset", "tiny", "--train-steps", "3",
                "--batch-size", "4", "--device", "cpu", "--quiet")
    correction = load_correction(cor, NOISE_MODELS)
    recorded = json.loads((cor / "correct.json").read_text())
    assert recorded["transformer_parameters"] == sum(p.numel() for p in pipe.denoiser.transformer.parameters())
    assert correction.base_steps == 3 and f"{recorded['parameters']:,} parameters" in output

    ok("t2i", "sample-corrected", "--noise-model", str(cor), "--prompt", "a photo of a red circle", "--per-prompt",
       "2", "--noise-steps", "2", "--out", str(out), "--seed", "5", "--device", "cpu", "--quiet")
    z = torch.randn(2, *pipe.state_shape, generator=torch.Generator().manual_seed(5))
    prompt_cond = pipe.prompt_encoder()(["a photo of a red circle"] * 2, guidance=pipe.info.guidance_scale != 1.0)
    want = pipe.decode(sample_noise_corrected(correction.noise_model, Guided(pipe.denoiser, pipe.info.guidance_scale),
                                              z, flow_times(2), pipe.times(3), cond=prompt_cond))
    torch.testing.assert_close(load_state(out / "images.safetensors"), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the scale benchmark
def test_flux_qwen_sana_scale_benchmark_real_configs_and_resumable_tiny_cells(tmp_path):
    """benchmarks/t2i_scale.py: every family's real config builds its diffusers classes' configs (checked
    without allocating weights), and a --tiny cell writes one finite row that a rerun skips."""
    import importlib.util

    import diffusers

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "t2i_scale.py"
    spec = importlib.util.spec_from_file_location("t2i_scale_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, stem in bench.REAL.items():
        real = json.loads((bench.CONFIGS / f"{stem}.json").read_text())
        assert real["family"] == name and real["source"]
        for part in ("transformer", "vae"):
            config = {k: v for k, v in real[part].items() if k != "_class_name"}
            cls = getattr(diffusers, real[part]["_class_name"])
            assert not set(config) - set(cls.extract_init_dict(config)[0]), (name, part)  # every key is a known arg
    out = tmp_path / "scale.csv"
    table = bench.main(["--tiny", "--families", "sana", "--precisions", "fp32", "--out", str(out)])
    assert len(table) == 1 and table["sample_images_per_s"].iloc[0] > 0 and table["train_steps_per_s"].iloc[0] > 0
    again = bench.main(["--tiny", "--families", "sana", "--precisions", "fp32", "--out", str(out)])
    pd.testing.assert_frame_equal(pd.read_csv(out), again.reset_index(drop=True), check_dtype=False)
    assert len(pd.read_csv(out)) == 1
