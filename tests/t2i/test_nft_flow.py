"""DiffusionNFT on the flow families (apps/t2i/train.py ``train_t2i_nft``), on a tiny random SD3 pipeline built
from configs (tests/t2i/test_sd3_flow.py): a round writes a LoRA that diffusers loads to the head's velocity, a
run cut after a committed round and resumed ends with the weights of an uninterrupted one, UNet pipelines are
refused in one line, and one round moves the mean of a known reward the way the reward points."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_sd3_flow import PROMPTS, build_tiny_sd3, check_lora_matches_head

from pgraft.apps.t2i.flow_pipeline import TRANSFORMER_ATTENTION
from pgraft.apps.t2i.train import (
    NFT_FAMILIES_ONLY,
    T2IConfig,
    T2IScorer,
    flow_velocity,
    load_pipeline,
    make_problem,
    train_t2i_nft,
)
from pgraft.core.bridges import LinearFlowPath
from pgraft.core.errors import UsageError
from pgraft.core.nft import NFTConfig, run_nft
from pgraft.core.rundir import RunDir
from pgraft.core.trainer import sample_finetuned


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    from pgraft.apps.t2i.world import all_prompts

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3", [s.text() for s in all_prompts()])


@pytest.fixture
def app(tiny_sd3, prompt_file, tmp_path) -> T2IConfig:
    # image brightness: distinct rewards within a group, so the optimality weights are not all 1/2
    (tmp_path / "brightness.py").write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    return T2IConfig(model=str(tiny_sd3), prompts=str(prompt_file), reward=str(tmp_path / "brightness.py") + ":score",
                     reward_weights=None, n_steps=3, guidance_scale=2.0)


def _cfg(**kw) -> NFTConfig:
    base = dict(rounds=1, groups=2, group_size=2, epochs=1, batch_size=4, lr=1e-2, lora_rank=2, sample_batch_size=4,
                final_eval=False, seed=0)
    return NFTConfig(**{**base, **kw})


def test_nft_round_writes_a_lora_diffusers_loads_to_the_heads_velocity(app, tiny_sd3, tmp_path):
    """One round on SD3: LoRA on the transformer attention, metrics finite, lora/ read back by
    StableDiffusion3Pipeline.load_lora_weights to the velocity of load_head's head, which differs from the base."""

    run = tmp_path / "nft"
    _, table = train_t2i_nft(app, _cfg(), run, show_progress=False)
    assert table["round"].tolist() == [0] and math.isfinite(table["train_loss"].iloc[0])
    assert table["positive_weight_mean"].iloc[0] == pytest.approx(0.5, abs=1e-6)  # advantages have mean 0
    config = json.loads((run / "config.json").read_text())
    assert config["nft"]["lora_targets"] == list(TRANSFORMER_ATTENTION) and config["app"]["t2i"]["eta"] == 0.0
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()

    check_lora_matches_head(run, tiny_sd3)


def test_a_cut_and_resumed_nft_run_ends_with_the_weights_of_an_uninterrupted_one(app, tmp_path, monkeypatch):
    """Two rounds straight, against two rounds stopped by an exception right after round 0 committed (its
    checkpoint written, as a kill there leaves it) and then resumed: the same rows, the same checkpoint
    weights and optimizer state bit for bit, the same lora/ tensors and metadata."""
    cfg = _cfg(rounds=2)
    _, full = train_t2i_nft(app, cfg, tmp_path / "full", show_progress=False)
    on_round = T2IScorer.on_round

    def cut(self, round_, result):
        on_round(self, round_, result)
        if round_ == 0:
            raise RuntimeError("cut")

    with monkeypatch.context() as patch:
        patch.setattr(T2IScorer, "on_round", cut)
        with pytest.raises(RuntimeError, match="cut"):
            train_t2i_nft(app, cfg, tmp_path / "cut", show_progress=False)
    assert RunDir(tmp_path / "cut", resume=True).latest_round() == 0 and not (tmp_path / "cut" / "lora").exists()
    _, resumed = train_t2i_nft(app, cfg, tmp_path / "cut", resume=True, show_progress=False)
    cols = ["round", "phase", "reward_mean", "reward_std", "train_loss", "positive_weight_mean"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])
    (r_full, w_full, s_full), (r_cut, w_cut, s_cut) = (RunDir(tmp_path / d, resume=True).load_checkpoint()
                                                       for d in ("full", "cut"))
    assert r_full == r_cut == 1 and w_full.keys() == w_cut.keys()
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
    exp_avg = [(s_full["optimizer"]["state"][i]["exp_avg"], s_cut["optimizer"]["state"][i]["exp_avg"])
               for i in s_full["optimizer"]["state"]]
    assert exp_avg and all(torch.equal(a, b) for a, b in exp_avg)
    lora = "lora/pytorch_lora_weights.safetensors"
    # the same tensors and metadata (the header's key order is not fixed by diffusers, so not the same bytes)
    from safetensors import safe_open

    full_lora, cut_lora = (safe_open(str(tmp_path / d / lora), "pt") for d in ("full", "cut"))
    assert full_lora.metadata() == cut_lora.metadata() and sorted(full_lora.keys()) == sorted(cut_lora.keys())
    assert all(torch.equal(full_lora.get_tensor(k), cut_lora.get_tensor(k)) for k in full_lora.keys())


def test_unet_pipelines_and_condition_dropout_are_refused_in_one_line(tiny_sd, app, tmp_path):
    with pytest.raises(UsageError) as err:
        train_t2i_nft(replace(app, model=str(tiny_sd), guidance_scale=None), _cfg(), tmp_path / "sd", show_progress=False)
    assert str(err.value) == f"{tiny_sd} is a UNet pipeline: {NFT_FAMILIES_ONLY}"
    with pytest.raises(UsageError, match=r"^cond_dropout 0.1: NFT trains the conditional velocity only; use 0$"):
        train_t2i_nft(replace(app, cond_dropout=0.1), _cfg(), tmp_path / "drop", show_progress=False)
    assert not (tmp_path / "sd").exists() and not (tmp_path / "drop").exists()  # refused before writing


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_nft_round_moves_a_known_reward_the_way_it_points(tiny_sd3, tmp_path, sign):
    """Reward = sign x the mean of the clean latent (a known function), SD3 sampled without guidance, full
    fine-tuning: after one round (12 candidates, 8 epochs) the head's mean reward on 48 fixed noises is above
    the base's on the same noises, for either sign (so the move follows the reward, not the regression)."""
    pipe = load_pipeline(tiny_sd3, guidance_scale=1.0)

    def reward(x0, cond):
        return sign * x0.flatten(1).mean(1)

    problem = make_problem(pipe, PROMPTS, reward, 3, 0.0)
    cfg = NFTConfig(rounds=1, groups=3, group_size=4, epochs=8, batch_size=12, lr=1e-3, sample_batch_size=12,
                    final_eval=False, seed=0)
    head, _ = run_nft(problem, LinearFlowPath(), pipe.denoiser, pipe.denoiser.init_kwargs(), cfg, tmp_path / "run",
                      show_progress=False, predict=flow_velocity)
    cond_index = torch.arange(len(PROMPTS)).repeat_interleave(16)
    means = [reward(sample_finetuned(problem, model, model, len(cond_index), 0.0, 7, 64, cond_index, False)[1],
                    None).mean().item() for model in (pipe.denoiser, head)]
    # measured: +0.016 (sign 1) and +0.018 (sign -1) over a base mean of 0.023 in latent units
    assert means[1] > means[0] + 0.005, means


def test_scale_benchmark_measures_graft_pgraft_and_nft_rows_on_one_cell(tmp_path):
    """benchmarks/t2i_scale.py --tiny --methods graft,pgraft,nft: one row per method on the same cell (same
    sampled images, same sampler throughput), finite, and a rerun measures nothing again."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "t2i_scale.py"
    spec = importlib.util.spec_from_file_location("t2i_scale_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--tiny", "--families", "sd3", "--precisions", "fp32", "--methods", "graft,pgraft,nft",
            "--out", str(tmp_path / "scale.csv")]
    table = bench.main(args)
    assert table["method"].tolist() == ["graft", "pgraft", "nft"] and (table["images"] == 4).all()
    assert table["sample_images_per_s"].nunique() == 1
    for column in ("train_steps_per_s", "round_seconds"):
        assert (table[column] > 0).all() and table[column].map(math.isfinite).all()
    pd.testing.assert_frame_equal(bench.main(args).reset_index(drop=True), pd.read_csv(tmp_path / "scale.csv"),
                                  check_dtype=False)
    assert len(pd.read_csv(tmp_path / "scale.csv")) == 3
    # a table cut inside its last row is refused in one line (and kept), not measured over
    whole = (tmp_path / "scale.csv").read_bytes()
    cut = whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 12]
    (tmp_path / "scale.csv").write_bytes(cut)
    with pytest.raises(UsageError, match=r"^--out .*scale.csv: row 4 has a missing or non-numeric value in column"):
        bench.main(args)
    assert (tmp_path / "scale.csv").read_bytes() == cut
