"""The text-to-image benchmark (benchmarks/t2i.py) on a tiny world in seconds, and the policy-gradient
log-density of the guided, clipped DDIM sampler."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pgraft.apps.t2i.model import build_world_pipeline
from pgraft.apps.t2i.prompts import load_prompts
from pgraft.apps.t2i.rewards import ScorerTrainConfig, train_scorer
from pgraft.apps.t2i.train import PretrainT2IConfig, log_prob, make_problem, pretrain_world
from pgraft.apps.t2i.world import all_prompts
from pgraft.core.state import load_state

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_benchmark():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the benchmark imports harness.py from its folder
    spec = importlib.util.spec_from_file_location("t2i_benchmark", BENCHMARKS / "t2i.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("t, t_next", [(1.0, 0.75), (0.5, 0.25)])
def test_log_prob_is_the_density_of_the_guided_sampler_step(tmp_path, t, t_next):
    """x_next = mean + sigma z from the problem's step  =>  log p = sum(-z^2/2) - D log sigma - D/2 log 2 pi,
    with DDIM's sigma = eta sqrt((1 - a_n)/(1 - a_t)) sqrt(1 - a_t/a_n) and the guided eps."""
    torch.manual_seed(0)
    pipe = build_world_pipeline("tiny", [s.text() for s in all_prompts()], tmp_path / "tok", guidance_scale=3.0)
    eta, prompts = 0.7, ["a photo of a red circle", "a photo of two squares", "a photo of a blue diamond"]
    problem = make_problem(pipe, prompts, None, 4, eta)
    cond = problem.cond_batch(torch.arange(3))
    assert cond.uncond is not None  # guided sampling
    x = torch.randn(3, *pipe.state_shape)
    with torch.no_grad():
        x_next = problem.step(pipe.denoiser, x, t, t_next, cond, torch.Generator().manual_seed(5))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        lp = log_prob(pipe, eta)(pipe.denoiser, x, t, t_next, x_next, cond)
        unguided = log_prob(pipe, eta)(pipe.denoiser, x, t, t_next, x_next, pipe.prompt_encoder()(prompts, False))
    a_t, a_n = float(pipe.alpha_bar(t)), float(pipe.alpha_bar(t_next))
    sigma = eta * math.sqrt((1 - a_n) / (1 - a_t) * (1 - a_t / a_n))
    d = z[0].numel()
    expected = (-0.5 * z.flatten(1) ** 2).sum(1) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(lp, expected, rtol=1e-4, atol=1e-3)
    # the unguided density is the Gaussian around the unguided mean, which guidance moves
    from pgraft.core.sampling import ddim_mean_std

    with torch.no_grad():
        m_u, _ = ddim_mean_std(pipe.denoiser, x, t, t_next, pipe.prompt_encoder()(prompts, False), pipe.alpha_bar,
                               eta, pipe.clip_sample)
        m_g, _ = ddim_mean_std(pipe.denoiser, x, t, t_next, cond, pipe.alpha_bar, eta, pipe.clip_sample)
    assert (m_u - m_g).abs().max() > 1e-3
    r = (x_next - m_u).flatten(1)
    expected_u = (-0.5 * (r / sigma) ** 2).sum(1) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(unguided, expected_u, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    pretrain_world(PretrainT2IConfig(preset="tiny", steps=8, n_images=64, batch_size=8, warmup=2), root / "base",
                   show_progress=False)
    train_scorer(ScorerTrainConfig(image_size=16, n_images=64, steps=5, batch_size=8), root / "scorer",
                 show_progress=False)
    return root


@pytest.mark.slow  # over 5 s here
def test_harness_benchmark_shares_seeds_budget_and_report(tiny_bench, tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "out"
    # train_steps=0: GRAFT / P-GRAFT heads keep LoRA's B = 0, i.e. equal the base, so with the shared
    # evaluation seed they must reproduce the base's held-out images exactly; PG does update.
    argv = ["--out", str(out), "--seeds", "0", "--methods", "base,sft_all,graft_topk,pgraft_0.5,pg,grpo",
            "--base", str(tiny_bench / "base"), "--scorer", str(tiny_bench / "scorer"), "--rounds", "1",
            "--groups", "2", "--m", "3", "--train-steps", "0", "--batch-size", "6", "--lr", "5e-2", "--lora", "2",
            "--n-steps", "4", "--sample-batch-size", "32", "--pg-timestep-fraction", "0.5", "--per-prompt", "1",
            "--quiet"]
    bench.harness.main(bench.BENCH, bench.__doc__, argv)
    held = load_prompts("heldout")
    cells = {c["method"]: c for c in bench.harness.load_cells(out)}
    samples = {m: pd.read_csv(out / "cells" / m / "seed_0" / "samples.csv") for m in cells}
    assert all(list(s["prompt"]) == held.prompts for s in samples.values())
    pd.testing.assert_series_equal(samples["pgraft_0.5"]["vqa"], samples["base"]["vqa"])
    pd.testing.assert_series_equal(samples["graft_topk"]["vqa"], samples["base"]["vqa"])
    assert not samples["pg"]["vqa"].equals(samples["base"]["vqa"])
    assert {m: c["sampled"] for m, c in cells.items()} == {"base": 0, "sft_all": 6, "graft_topk": 6,
                                                           "pgraft_0.5": 6, "pg": 6, "grpo": 6}
    assert all(c["eval_seed"] == bench.harness.eval_seed(0) for c in cells.values())
    # the control keeps every candidate; Top-2 of 3 keeps two per group
    accept = {m: pd.read_csv(out / "cells" / m / "seed_0" / "run" / "metrics.csv")["accept_rate"].iloc[0]
              for m in ("sft_all", "graft_topk")}
    assert accept == {"sft_all": 1.0, "graft_topk": pytest.approx(2 / 3)}
    # GRPO is the same policy gradient plus the KL-to-base term at beta 0.04 (logged; PG has none). Its one
    # update here starts at the base, where the KL and its gradient vanish: the same head as PG's
    pg_rows, grpo_rows = (pd.read_csv(out / "cells" / m / "seed_0" / "run" / "metrics.csv") for m in ("pg", "grpo"))
    assert "kl_to_base" not in pg_rows and grpo_rows["kl_to_base"].abs().max() < 1e-6
    pd.testing.assert_series_equal(samples["grpo"]["vqa"], samples["pg"]["vqa"])
    # accuracy = the share of correct images; overall = GenEval's mean of the per-category accuracies
    pg = cells["pg"]["metrics"]
    per_cat = samples["pg"].groupby("category")["correct"].mean()
    assert pg["accuracy"] == pytest.approx(samples["pg"]["correct"].mean())
    assert pg["overall"] == pytest.approx(per_cat.mean())
    for cat, acc in per_cat.items():
        assert pg[cat] == pytest.approx(acc)
    assert cells["pg"]["extra"]["heldout_images"] == len(held.prompts)
    assert len(cells["base"]["extra"]["base_sha256"]) == 64
    grid = load_state(out / "cells" / "base" / "seed_0" / "grid.safetensors")
    assert grid.shape == (len(set(held.categories)), 3, 16, 16)
    torch.testing.assert_close(load_state(out / "cells" / "pgraft_0.5" / "seed_0" / "grid.safetensors"), grid)
    for name in ("seeds.csv", "summary.csv", "verdicts.txt", "t2i_seeds.png", "t2i_grid.png", "t2i_rounds.png"):
        assert (out / name).stat().st_size > 0
    verdicts = (out / "verdicts.txt").read_text()
    assert "held-out evaluation: n = 62 images per cell" in verdicts
    assert json.loads((out / "settings.json").read_text())["settings"]["per_prompt"] == 1


def test_missing_base_is_refused_in_one_line(tmp_path, capsys):
    bench = _load_benchmark()
    with pytest.raises(SystemExit) as exc:
        bench.harness.main(bench.BENCH, bench.__doc__, ["--out", str(tmp_path / "o"), "--base", str(tmp_path / "none")])
    assert "pgraft t2i pretrain" in str(exc.value) and "\n" not in str(exc.value)
