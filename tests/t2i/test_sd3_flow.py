"""Flow-matching text-to-image pipelines (the SD3 / SD3.5 family) on tiny random StableDiffusion3Pipeline
directories built from configs (no downloads): detection of the kind, the sampler against diffusers' own
pipeline, the time convention of the linear-flow (P-GRAFT) loss against the scheduler, GRAFT / P-GRAFT
rounds, Flow-GRPO's SDE log-density and a policy-gradient step, LoRA export read back by diffusers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from two_processes import assert_two_processes_accept_alike
from typer.testing import CliRunner

from pgraft.apps.t2i.cli import app
from pgraft.apps.t2i.flow_pipeline import (
    TRANSFORMER_ATTENTION,
    FlowDenoiser,
    FlowT2IPipeline,
    pipeline_kind,
)
from pgraft.apps.t2i.tiny import build_tiny_sd3  # noqa: F401 (the other test modules import it from here)
from pgraft.apps.t2i.train import (
    APP,
    T2IConfig,
    drop_conditions,
    load_head,
    load_pipeline,
    log_prob,
    make_problem,
    train_t2i,
)
from pgraft.core.bridges import LinearFlowPath
from pgraft.core.grs import GRSConfig
from pgraft.core.losses import flow_matching_loss
from pgraft.core.sampling import euler_step, flow_sde_log_prob, flow_sde_mean_std, flow_sde_step, sample_split
from pgraft.core.schedules import split_times
from pgraft.core.trainer import GraftConfig

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]


@pytest.fixture(scope="module")
def world_texts() -> list[str]:
    from pgraft.apps.t2i.world import all_prompts

    return [s.text() for s in all_prompts()]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory, world_texts) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3", world_texts)


@pytest.fixture(scope="module")
def tiny_sd3_no_t5(tmp_path_factory, world_texts) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3_no_t5", world_texts, seed=1, t5=False)


def _cfg(**kw) -> GraftConfig:
    base = dict(rounds=1, groups=2, group_size=2, grs=GRSConfig(rule="topk", k=1), split=0.0, train_steps=2,
                batch_size=2, lr=1e-2, lora_rank=2, sample_batch_size=4, seed=0, final_eval=False)
    return GraftConfig(**{**base, **kw})


def _perturbed(denoiser: FlowDenoiser, scale: float = 0.05) -> FlowDenoiser:
    import copy

    head = copy.deepcopy(denoiser)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return head


# ----------------------------------------------------------------------------- detection
def test_sd3_kind_is_detected_from_model_index_and_scheduler(tiny_sd3, tiny_sd3_no_t5, tiny_sd, tmp_path):
    assert pipeline_kind(tiny_sd3) == pipeline_kind(tiny_sd3_no_t5) == "sd3"
    assert pipeline_kind(tiny_sd) == "sd"
    assert APP.lacks(tiny_sd3) is None and APP.lacks(tiny_sd3_no_t5) is None
    pipe = load_pipeline(tiny_sd3_no_t5, guidance_scale=2.0)
    assert isinstance(pipe, FlowT2IPipeline) and isinstance(pipe.denoiser, FlowDenoiser)
    assert pipe.sd3.text_encoder_3 is None and pipe.state_shape == (4, 8, 8) and pipe.info.shift == 3.0
    cond = pipe.prompt_encoder()(PROMPTS)
    # CLIP-L/G hidden states (16 tokens) + the zero block diffusers puts where T5 would be (256 tokens)
    assert cond.embeds.shape == (3, 16 + 256, 32) and cond.pooled.shape == (3, 32)
    assert not cond.embeds[:, 16:].any() and cond.uncond.shape == (1, 272, 32)
    # condition dropout replaces a prompt's pooled embedding along with its sequence embedding
    dropped = drop_conditions(cond, 0.5, torch.Generator().manual_seed(1))
    for i, q in enumerate(dropped.prompts):
        want = (cond.uncond[0], cond.uncond_pooled[0]) if q == "" else (cond.embeds[i], cond.pooled[i])
        torch.testing.assert_close((dropped.embeds[i], dropped.pooled[i]), want)
    assert "" in dropped.prompts and set(dropped.prompts) != {""}
    # the kind comes from the files, not a flag: another flow-matching pipeline class (Flux) is named and refused,
    # a StableDiffusion3Pipeline directory missing a component is named as such
    flux = tmp_path / "flux"
    (flux / "scheduler").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (flux / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match="FluxPipeline"):
        pipeline_kind(flux)
    assert "FluxPipeline" in APP.lacks(flux)
    broken = tmp_path / "broken"
    (broken / "scheduler").mkdir(parents=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert "no transformer/" in APP.lacks(broken)


# ----------------------------------------------------------------------------- sampler vs diffusers
@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_sd3_no_t5"])
def test_sd3_euler_sampler_matches_the_diffusers_pipeline(fixture, request):
    """Our deterministic sampler (eta 0) on the scheduler's shifted sigma grid, with classifier-free guidance
    and the VAE's scaling/shift factors, reproduces StableDiffusion3Pipeline.__call__ from the same latents."""
    from diffusers import StableDiffusion3Pipeline

    directory = request.getfixturevalue(fixture)
    pipe = load_pipeline(directory, guidance_scale=3.0)
    problem = make_problem(pipe, PROMPTS, None, 4, None)  # eta None: the flow default, Euler
    x_T = problem.prior(3, torch.Generator().manual_seed(5))
    cond = problem.cond_batch(torch.arange(3))
    ours = sample_split(pipe.denoiser, pipe.denoiser, x_T, problem.times, len(problem.times) - 1, problem.step, cond)
    # a pipeline saved without T5 has no text_encoder_3 entry: diffusers is told it is absent
    no_t5 = {} if (directory / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    ref = StableDiffusion3Pipeline.from_pretrained(str(directory), **no_t5)
    with torch.no_grad():
        latents = ref(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=x_T.clone(), output_type="latent").images
        images = ref(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=x_T.clone(), output_type="pt").images
    torch.testing.assert_close(ours.x_0, latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((pipe.decode(ours.x_0) + 1) / 2, images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(problem.times.float(), ref.scheduler.sigmas)  # the grid diffusers stepped on


# ----------------------------------------------------------------------------- time convention
def test_flow_loss_time_convention_matches_the_scheduler(tiny_sd3):
    """core time t = sigma: the linear path is the scheduler's scale_noise, its target eps - x_0 is the
    velocity the scheduler's step (and the core Euler step) moves along toward the data, the transformer sees
    timestep 1000 sigma, and the (P-GRAFT) flow loss vanishes at the true conditional velocity."""
    pipe = load_pipeline(tiny_sd3, guidance_scale=1.0)
    sched = pipe.scheduler
    times = pipe.times(6)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for i, (s, s_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        ts = sched.timesteps[i].expand(2)
        path = LinearFlowPath(0.0).sample(x0, eps, torch.full((2,), s))
        torch.testing.assert_close(path.x_t, sched.scale_noise(x0, ts, eps))  # x_s = (1-s) x_0 + s eps
        torch.testing.assert_close(path.target, eps - x0)
        sched._step_index = i
        stepped = sched.step(path.target, sched.timesteps[i], path.x_t).prev_sample
        nxt = LinearFlowPath(0.0).sample(x0, eps, torch.full((2,), s_next)).x_t
        torch.testing.assert_close(stepped, nxt, atol=1e-5, rtol=1e-5)  # one step along v lands on the path
        oracle = lambda x, t, c: path.target  # noqa: E731
        torch.testing.assert_close(euler_step(oracle, path.x_t, s, s_next), stepped, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.denoiser.timesteps(torch.full((2,), s)), ts)  # timestep = 1000 sigma
    # the loss in this clock: 0 at the true velocity, the reversed sign is far from it
    gen_a, gen_b = (torch.Generator().manual_seed(3) for _ in range(2))
    true_v = lambda x, s, c: (x - x0) / s.view(-1, 1, 1, 1)  # = eps - x_0 on x_s = (1-s) x_0 + s eps  # noqa: E731
    assert flow_matching_loss(true_v, x0, 0.0, None, gen_a) < 1e-10
    assert flow_matching_loss(lambda x, s, c: -true_v(x, s, c), x0, 0.0, None, gen_b) > 1.0
    # P-GRAFT: restarted at the split's sigma from X_t, the conditional target is met exactly by the velocity
    # of the bridge (oracle knowing X_t), and its conditional mean is the base field (x - x_0)/s for point data
    t = float(split_times(times, 0.5).t)
    x_t = (1 - t) * x0 + t * eps
    c = t**2 / (1 - t) ** 2

    def bridge_v(x, s, _):
        s_ = s.view(-1, 1, 1, 1).double()
        sigma = (s_**2 - (1 - s_) ** 2 * c).sqrt()
        eta = (x.double() - (1 - s_) / (1 - t) * x_t) / sigma
        return (-x_t / (1 - t) + (s_ + (1 - s_) * c) / sigma * eta).float()

    assert flow_matching_loss(bridge_v, x_t, t, None, torch.Generator().manual_seed(4)) < 1e-8
    s = 0.7
    m, var = (1 - s) / (1 - t), s**2 - (1 - s) ** 2 * c
    cov = -m * t**2 / (1 - t) + (s + (1 - s) * c)  # Cov(u, X_s) per entry, X_0 fixed (noise of X_t: t eps')
    assert var + m**2 * t**2 == pytest.approx(s**2)  # the restarted path keeps the base's noise level s
    assert cov / s**2 == pytest.approx(1 / s)  # E[u | X_s] = -x_0 + (X_s - (1-s) x_0)/s = (X_s - x_0)/s


def check_lora_matches_head(run: Path, tiny_sd3: Path) -> tuple:
    """A trained run's head moved off the base, and diffusers' ``load_lora_weights`` of ``run/lora`` gives
    the head's velocity on the same inputs; returns (x, t, cond, head velocity) for further checks."""
    from diffusers import StableDiffusion3Pipeline

    pipe = load_pipeline(tiny_sd3, guidance_scale=2.0)
    head = load_head(run, pipe.denoiser)
    cond = pipe.prompt_encoder()(PROMPTS[:2], guidance=False)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.4])
    ref = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    with torch.no_grad():
        head_v = head(x, t, cond)
        assert not torch.allclose(head_v, pipe.denoiser(x, t, cond), atol=1e-4)
        ref.load_lora_weights(str(run / "lora"))
        assert any("lora" in name for name, _ in ref.transformer.named_parameters())
        lora_v = ref.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.embeds,
                                 pooled_projections=cond.pooled).sample
    torch.testing.assert_close(lora_v, head_v, atol=1e-5, rtol=1e-4)
    return x, t, cond, head_v


# ----------------------------------------------------------------------------- GRAFT / P-GRAFT rounds
def test_sd3_graft_round_by_cli_lora_reloads_with_diffusers(tiny_sd3, tmp_path):
    """GRAFT (--t 0) through `pgraft t2i train`: the LoRA goes on the transformer's to_q/to_k/to_v/to_out.0, is
    written by save_lora_weights and read back by StableDiffusion3Pipeline.load_lora_weights to the same
    outputs; pipeline/ (the merged head as a pipeline directory) loads with from_pretrained; `sample` reads it."""
    from diffusers import StableDiffusion3Pipeline

    run = tmp_path / "graft"
    res = CliRunner().invoke(app, ["train", "--out", str(run), "--model", str(tiny_sd3), "--prompts", "heldout",
                                   "--reward", "checker", "--rounds", "1", "--groups", "2", "--m", "2", "--k", "1",
                                   "--t", "0", "--train-steps", "2", "--batch-size", "2", "--n-steps", "3", "--lora", "2",
                                   "--lr", "1e-2", "--guidance", "2.0", "--quiet"])
    assert res.exit_code == 0, res.output
    config = json.loads((run / "config.json").read_text())
    assert config["graft"]["lora_targets"] == list(TRANSFORMER_ATTENTION) and config["t"] == 0.0
    assert config["app"]["t2i"]["eta"] == 0.0  # recorded: the deterministic Euler sampler
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["phase"]) == ["train", "eval"] and metrics["train_loss"].notna().tolist() == [True, False]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()

    x, t, cond, head_v = check_lora_matches_head(run, tiny_sd3)
    with torch.no_grad():
        merged = StableDiffusion3Pipeline.from_pretrained(str(run / "pipeline")).transformer
        torch.testing.assert_close(merged(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.embeds,
                                          pooled_projections=cond.pooled).sample, head_v, atol=1e-5, rtol=1e-4)
    res = CliRunner().invoke(app, ["sample", str(run), "--per-prompt", "1", "--max-prompts", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (run / "samples" / "grid.png").is_file()


def test_sd3_pgraft_round_base_runs_exactly_the_steps_after_the_split(tiny_sd3, tmp_path, monkeypatch):
    """P-GRAFT (t = 0.5 of 4 steps): in sampling the LoRA head runs the first two sigmas and the frozen base
    exactly the last two; fine-tuning calls only the head, at sigmas above the split's; afterwards the head's
    velocity differs from the base's and the split sampler differs from head-only and base-only sampling."""
    calls: list[tuple[bool, bool, tuple[float, ...]]] = []
    forward = FlowDenoiser.forward

    def spy(self, x, t, cond, guidance_scale=None):
        is_head = any("lora_" in name for name, _ in self.named_parameters())
        calls.append((is_head, torch.is_grad_enabled(), tuple(t.tolist())))
        return forward(self, x, t, cond, guidance_scale)

    monkeypatch.setattr(FlowDenoiser, "forward", spy)
    app_cfg = T2IConfig(model=str(tiny_sd3), prompts="heldout", reward="checker", reward_weights=None, n_steps=4,
                        guidance_scale=2.0)
    head, table = train_t2i(app_cfg, _cfg(split=0.5), tmp_path / "run", show_progress=False)
    monkeypatch.setattr(FlowDenoiser, "forward", forward)
    pipe = load_pipeline(tiny_sd3, guidance_scale=2.0)
    times = [float(torch.tensor(s, dtype=torch.float32)) for s in pipe.times(4)[:-1].tolist()]
    t_split = json.loads((tmp_path / "run" / "config.json").read_text())["t"]
    assert t_split == pytest.approx(float(pipe.times(4)[2]))
    sampled = [(h, ts[0]) for h, grad, ts in calls if not grad]
    assert len(sampled) == 4  # one chunk of 4 images, 4 steps
    assert [s for h, s in sampled if h] == pytest.approx(times[:2])
    assert [s for h, s in sampled if not h] == pytest.approx(times[2:])
    trained = [ts for h, grad, ts in calls if grad]
    assert len(trained) == 2 and all(h for h, grad, _ in calls if grad)
    assert min(min(ts) for ts in trained) >= t_split
    assert (tmp_path / "run" / "store" / "round_0000.parquet").is_file()  # the accepted X_t the loss restarts from

    cond = pipe.prompt_encoder()(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.8])
    with torch.no_grad():
        assert not torch.allclose(head(x, t, cond), pipe.denoiser(x, t, cond), atol=1e-4)
    # the split sampler's composition, with a clearly different head
    other = _perturbed(pipe.denoiser)
    problem = make_problem(pipe, PROMPTS[:2], None, 4, None)
    x_T = problem.prior(2, torch.Generator().manual_seed(0))
    k = split_times(problem.times, 0.5).index
    split = sample_split(other, pipe.denoiser, x_T, problem.times, k, problem.step, cond).x_0
    all_head = sample_split(other, other, x_T, problem.times, k, problem.step, cond).x_0
    all_base = sample_split(pipe.denoiser, pipe.denoiser, x_T, problem.times, k, problem.step, cond).x_0
    assert not torch.allclose(split, all_head) and not torch.allclose(split, all_base)


# ----------------------------------------------------------------------------- policy gradient
def _flow_grpo_step(sched, i: int, v: torch.Tensor, x: torch.Tensor, noise_level: float):
    """Flow-GRPO's sde_step_with_logprob (sde_type="sde"), transcribed on the scheduler's sigmas: mean, std."""
    sigma, sigma_prev, sigma_max = sched.sigmas[i].double(), sched.sigmas[i + 1].double(), sched.sigmas[1].double()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x.double() * (1 + std_dev_t**2 / (2 * sigma) * dt) + v.double() * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * torch.sqrt(-dt)


def test_flow_sde_log_prob_closed_form_and_one_policy_gradient_step(tiny_sd3, tmp_path):
    from pgraft.core.policy_gradient import PGConfig, run_policy_gradient

    pipe = load_pipeline(tiny_sd3, guidance_scale=2.0)
    times = pipe.times(4)
    cond = pipe.prompt_encoder()(PROMPTS[:2])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    lp = log_prob(pipe, 0.7)
    with torch.no_grad():
        for i, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
            v = pipe.denoiser(x, torch.full((2,), t), cond)
            mean, std = flow_sde_mean_std(pipe.denoiser, x, t, t_next, cond, 0.7)
            ref_mean, ref_std = _flow_grpo_step(pipe.scheduler, i, v, x, 0.7)
            torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)
            assert std == pytest.approx(float(ref_std), rel=1e-6) and std > 0
            x_next = flow_sde_step(0.7)(pipe.denoiser, x, t, t_next, cond, torch.Generator().manual_seed(i))
            got = lp(pipe.denoiser, x, t, t_next, x_next, cond)
            closed = torch.distributions.Normal(ref_mean, ref_std).log_prob(x_next.double()).flatten(1).sum(1)
            assert torch.isfinite(got).all() and got.shape == (2,)
            torch.testing.assert_close(got, closed, atol=1e-6 * x.numel(), rtol=1e-6)
            # Flow-GRPO's own number is the mean over the latent's entries: the core's "mean" reduction
            d = x_next.double() - ref_mean
            flow_grpo = (-(d**2) / (2 * ref_std**2) - torch.log(ref_std) - math.log(math.sqrt(2 * math.pi))).mean((1, 2, 3))
            torch.testing.assert_close(got / x[0].numel(), flow_grpo, atol=1e-8, rtol=1e-6)
            # noise level 0 is the Euler ODE step
            torch.testing.assert_close(flow_sde_step(0.0)(pipe.denoiser, x, t, t_next, cond),
                                       euler_step(pipe.denoiser, x, t, t_next, cond))
            x = x_next
    with pytest.raises(ValueError, match="stochastic"):
        flow_sde_log_prob(0.0)
    # one PG round on the same SDE sampler (LoRA on the transformer attention): finite, and the policy moves
    problem = make_problem(pipe, PROMPTS, lambda x0, c: x0.flatten(1).mean(1), 3, 0.7)
    cfg = PGConfig(rounds=1, groups=2, group_size=2, batch_size=4, lr=1e-2, clip=0.2, lora_rank=2,
                   lora_targets=TRANSFORMER_ATTENTION, sample_batch_size=4, final_eval=False, seed=0)
    head, metrics = run_policy_gradient(problem, log_prob(pipe, 0.7), pipe.denoiser, pipe.denoiser.init_kwargs(), cfg,
                                        tmp_path / "pg", show_progress=False)
    row = metrics.iloc[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["approx_kl"])
    with torch.no_grad():
        xx, tt = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.5])
        assert not torch.allclose(head(xx, tt, cond), pipe.denoiser(xx, tt, cond), atol=1e-5)


# ----------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_sd3_flow_train_two_processes_accept_the_same_set_as_one(tiny_sd3, tmp_path):
    """README's multi-GPU command on the CPU: `pgraft t2i train` on a flow (SD3) directory under torchrun with 2
    processes accepts the same images, with the same rewards, as one process (tests/t2i/two_processes.py)."""
    assert_two_processes_accept_alike(tiny_sd3, tmp_path)


# ----------------------------------------------------------------------------- GPU throughput
@pytest.mark.gpu
def test_sd3_flow_throughput_gpu(tmp_path, world_texts):
    """Images/s of the split sampler and seconds per LoRA training step, peak GPU memory, on a tiny random SD3
    pipeline (real weights are not downloadable here: numbers for plumbing, not for a model)."""
    from pgraft.core.heads import apply_lora

    directory = build_tiny_sd3(tmp_path / "sd3", world_texts)
    pipe = load_pipeline(directory, guidance_scale=4.0)
    device = torch.device("cuda")
    pipe.denoiser.to(device)
    torch.cuda.reset_peak_memory_stats()
    problem = make_problem(pipe, PROMPTS * 22, None, 20, None)
    n = 64
    cond = problem.cond_batch(torch.arange(n) % 3)
    x_T = problem.prior(n, torch.Generator().manual_seed(0)).to(device)
    k = split_times(problem.times, 0.25).index
    sample_split(pipe.denoiser, pipe.denoiser, x_T, problem.times, k, problem.step, cond)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = sample_split(pipe.denoiser, pipe.denoiser, x_T, problem.times, k, problem.step, cond)
    images = pipe.decode(out.x_0)
    torch.cuda.synchronize()
    sample_ips = n / (time.perf_counter() - t0)
    head = apply_lora(_perturbed(pipe.denoiser, 0.0).requires_grad_(True).train(), 4, 4, TRANSFORMER_ATTENTION)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-4)
    x = out.x_t.to(device)
    times = []
    for step in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = problem.loss(head, x, out.t, cond, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"\nsd3 tiny: sampling {sample_ips:.1f} images/s (20 steps, CFG), training step {step_s * 1000:.1f} ms "
          f"(batch {n}), peak {peak:.0f} MiB")
    assert images.shape == (n, 3, 16, 16) and torch.isfinite(images).all()
    assert sample_ips > 0 and math.isfinite(float(loss)) and peak > 0
