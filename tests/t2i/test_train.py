"""End-to-end smoke runs in seconds: tiny pretrain, GRAFT / P-GRAFT rounds with LoRA on the world
and on a tiny random Stable Diffusion pipeline, LoRA save/reload, the CLI."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pgraft.apps.t2i.cli import app
from pgraft.apps.t2i.model import T2IPipeline
from pgraft.apps.t2i.train import (
    PretrainT2IConfig,
    T2IConfig,
    drop_conditions,
    load_head,
    make_problem,
    pretrain_world,
    sample_images,
    train_t2i,
)
from pgraft.core.grs import GRSConfig
from pgraft.core.trainer import GraftConfig


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "base"
    pretrain_world(PretrainT2IConfig(preset="tiny", steps=8, n_images=64, batch_size=8, warmup=2), out,
                   show_progress=False)
    return out


def _cfg(**kw) -> GraftConfig:
    base = dict(rounds=1, groups=3, group_size=3, grs=GRSConfig(rule="topk", k=1), split=0.25, train_steps=2,
                batch_size=3, lr=1e-2, lora_rank=2, sample_batch_size=5, seed=0)
    return GraftConfig(**{**base, **kw})


def test_pretrain_writes_a_diffusers_pipeline(tiny_world):
    for part in ("unet", "text_encoder", "tokenizer", "pgraft.json", "pretrain/loss.csv"):
        assert (tiny_world / part).exists(), part
    pipe = T2IPipeline.load(tiny_world)
    assert pipe.state_shape == (12, 8, 8) and pipe.info.preset == "tiny"


def test_condition_dropout_swaps_whole_prompts_for_the_empty_one(tiny_world):
    pipe = T2IPipeline.load(tiny_world, guidance_scale=2.0)
    prompts = [f"a photo of {n} circles" for n in ("two", "three", "four")] * 20
    cond = pipe.prompt_encoder()(prompts)
    assert drop_conditions(cond, 0.0, None) is cond
    out = drop_conditions(cond, 0.3, torch.Generator().manual_seed(4))
    dropped = torch.rand(len(prompts), generator=torch.Generator().manual_seed(4)) < 0.3  # the same draws
    assert 0 < int(dropped.sum()) < len(prompts)
    assert [q == "" for q in out.prompts] == dropped.tolist()
    torch.testing.assert_close(out.embeds[dropped], cond.uncond.expand(int(dropped.sum()), -1, -1))
    torch.testing.assert_close(out.embeds[~dropped], cond.embeds[~dropped])
    with pytest.raises(ValueError, match="empty prompt"):
        drop_conditions(pipe.prompt_encoder()(prompts, guidance=False), 0.3, None)
    with pytest.raises(ValueError, match="guidance"):
        make_problem(T2IPipeline.load(tiny_world, guidance_scale=1.0), prompts, None, 4, 1.0, cond_dropout=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_problem(pipe, prompts, None, 4, 1.0, cond_dropout=1.0)


def test_graft_round_with_lora_on_the_world(tiny_world, tmp_path):
    app_cfg = T2IConfig(model=str(tiny_world), prompts="heldout", reward="checker", reward_weights=None, n_steps=4)
    head, table = train_t2i(app_cfg, _cfg(rounds=2), tmp_path / "run", show_progress=False)
    assert list(table["phase"]) == ["train", "train", "eval"]
    assert {"checker_acc", "reward_mean", "accepted"} <= set(table.columns)
    assert sorted(p.name for p in (tmp_path / "run" / "grids").glob("*.png")) == \
        ["round_0000.png", "round_0001.png", "round_0002.png"]
    records = pd.read_parquet(tmp_path / "run" / "store" / "round_0000.parquet")
    assert len(records) == 3 and {"prompt", "category", "correct", "reward"} <= set(records.columns)
    assert (records["reward"] == records["correct"].astype(float)).all()  # checker reward is the verdict
    # LoRA only on the UNet attention; the diffusers-format export reloads to the merged head exactly
    weights = json.loads((tmp_path / "run" / "config.json").read_text())["graft"]
    assert weights["lora_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    pipe = T2IPipeline.load(tiny_world)
    reloaded = load_head(tmp_path / "run", pipe.denoiser)
    x, t = torch.randn(2, *pipe.state_shape), torch.tensor([0.9, 0.95])
    cond = pipe.prompt_encoder()(["a photo of a circle"] * 2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, cond), head(x, t, cond))
        assert not torch.allclose(pipe.denoiser(x, t, cond), head(x, t, cond))
    # resume: extending a finished run by one round trains only the new round
    _, table2 = train_t2i(app_cfg, _cfg(rounds=3), tmp_path / "run", resume=True, show_progress=False)
    assert list(table2["round"]) == [0, 1, 2, 3]


def test_split_sampler_uses_frozen_tail(tiny_world):
    pipe = T2IPipeline.load(tiny_world)
    prompts = ["a photo of a red circle"]
    a, _ = sample_images(pipe, pipe.denoiser, prompts, 2, 0.5, 4, 1.0, seed=3, show_progress=False)
    b, _ = sample_images(pipe, pipe.denoiser, prompts, 2, 0.0, 4, 1.0, seed=3, show_progress=False)
    torch.testing.assert_close(a, b)  # head == base: the split is invisible
    assert a.shape == (2, 3, 16, 16)
    # a head unlike the base: the split sampler runs it for the first half only, the base after
    head = copy.deepcopy(pipe.denoiser)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    split, _ = sample_images(pipe, head, prompts, 2, 0.5, 4, 1.0, seed=3, show_progress=False)
    all_head, _ = sample_images(pipe, head, prompts, 2, 0.0, 4, 1.0, seed=3, show_progress=False)
    assert not torch.allclose(split, a) and not torch.allclose(split, all_head)


def test_sd_path_pgraft_lora_round_trip(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    app_cfg = T2IConfig(model=str(tiny_sd), prompts="train", reward="checker", reward_weights=None, n_steps=4,
                        guidance_scale=2.0)
    head, table = train_t2i(app_cfg, _cfg(split=0.5), tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = T2IPipeline.load(tiny_sd, guidance_scale=2.0)
    reloaded = load_head(tmp_path / "run", pipe.denoiser)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.7])
    cond = pipe.prompt_encoder()(["a photo of a circle"] * 2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, cond), head(x, t, cond))
    # the LoRA file is what diffusers' own loader expects
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    sd.load_lora_weights(str(tmp_path / "run" / "lora"))
    assert any("lora" in name for name, _ in sd.unet.named_parameters())


def test_cli_train_sample_evaluate(tiny_world, tmp_path):
    runner = CliRunner()
    run = tmp_path / "cli"
    res = runner.invoke(app, ["train", "--out", str(run), "--model", str(tiny_world), "--prompts", "heldout",
                              "--reward", "checker", "--rounds", "1", "--groups", "2", "--m", "2", "--k", "1",
                              "--train-steps", "1", "--batch-size", "2", "--n-steps", "3", "--lora", "2",
                              "--sample-batch-size", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["graft"]["anchor"] == 5.0  # the app's default trust region
    assert pd.read_csv(run / "metrics.csv")["anchor_penalty"].notna().any()
    res = runner.invoke(app, ["sample", str(run), "--per-prompt", "2", "--max-prompts", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (run / "samples" / "grid.png").is_file()
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--prompts", "heldout", "--per-prompt", "1",
                              "--reward", "checker", "--quiet"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(run / "eval" / "accuracy.csv", index_col=0)
    assert {"overall", "counting", "color_attr", "mean_checker"} <= set(table.columns)


@pytest.mark.parametrize("reward,weights", [("vqascore", "tiny_llava"), ("itm", "tiny_blip")])
def test_cli_sd_path_with_a_transformers_reward(tiny_sd, reward, weights, request, tmp_path):
    """The real path end to end: a diffusers SD directory, fine-tuned with a local transformers reward."""
    run = tmp_path / "sd"
    res = CliRunner().invoke(app, ["train", "--out", str(run), "--model", str(tiny_sd), "--prompts", "heldout",
                                   "--reward", reward, "--reward-weights", str(request.getfixturevalue(weights)),
                                   "--rounds", "1", "--groups", "2", "--m", "2", "--k", "1", "--train-steps", "1",
                                   "--batch-size", "2", "--n-steps", "3", "--lora", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["reward_mean"].between(0, 1).all()  # P(Yes) / P(match) of every round, eval row included
    assert metrics.loc[metrics["phase"] == "train", "accepted"].tolist() == [2]  # Top-1 of 2 in each of 2 groups


@pytest.mark.parametrize("args,match", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--prompts", "/nonexistent/p.txt"], "neither a registered set"),
    (["--reward", "nope"], "unknown reward"),
])
def test_cli_clear_errors(tiny_world, tmp_path, args, match):
    base = ["train", "--out", str(tmp_path / "r"), "--model", str(tiny_world), "--reward", "checker", "--quiet"]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code != 0 and match in res.output


@pytest.mark.slow
def test_two_processes_write_one_grid_per_round_and_agree_on_the_first(tiny_world, tmp_path):
    """The scorer's grids follow the round the core names: under torchrun (2 CPU processes, each
    scoring its own chunks) every round still gets exactly one grid, and round 0's grid and
    accepted records equal a 1-process run's (same chunks, same seeds)."""
    import os
    import shutil
    import subprocess
    import sys

    pgraft = shutil.which("pgraft")
    common = ["t2i", "train", "--model", str(tiny_world), "--prompts", "heldout", "--reward", "checker",
              "--rounds", "2", "--groups", "4", "--group-size", "2", "--top-k", "1", "--train-steps", "1",
              "--batch-size", "2", "--n-steps", "3", "--lora", "2", "--sample-batch-size", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([pgraft, *common, "--out", str(tmp_path / "one")], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    subprocess.run([*torchrun, pgraft, *common, "--out", str(tmp_path / "two")], check=True, env=env)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    for run in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / run / "grids").glob("*.png")) == \
            ["round_0000.png", "round_0001.png", "round_0002.png"]
    assert (tmp_path / "one" / "grids" / "round_0000.png").read_bytes() == \
        (tmp_path / "two" / "grids" / "round_0000.png").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / "store" / "round_0000.parquet"),
                                  pd.read_parquet(tmp_path / "two" / "store" / "round_0000.parquet"))
