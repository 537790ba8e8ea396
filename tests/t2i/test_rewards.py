"""Rewards: the exact checker reward, caption corruption, the learned scorer's plumbing, CLIPScore on
a tiny random CLIP built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgraft.apps.t2i.checker import check
from pgraft.apps.t2i.rewards import (REWARDS, CLIPScoreReward, ScorerTrainConfig, VQAScorer, corrupt_prompt,
                                     make_reward, train_scorer)
from pgraft.apps.t2i.world import all_prompts, render_dataset, to_float

ALL = [s.text() for s in all_prompts()]


def test_checker_reward_is_the_verdict():
    images, caps = render_dataset(ALL, 40, 32, seed=2)
    r = make_reward("checker")(to_float(images), caps)
    assert r.shape == (40,) and torch.all(r == 1.0)
    assert torch.all(make_reward("checker")(-torch.ones(3, 3, 32, 32), caps[:3]) == 0.0)


def test_corruptions_are_grammatical_and_false():
    rng = np.random.default_rng(0)
    images, caps = render_dataset(ALL, 200, 32, seed=9)
    bad = [corrupt_prompt(c, rng) for c in caps]
    assert all(b != c for b, c in zip(bad, caps))
    assert not check(to_float(images), bad).any()


def test_scorer_trains_saves_and_scores(tmp_path):
    cfg = ScorerTrainConfig(image_size=16, n_images=64, steps=5, batch_size=8)
    model, metrics = train_scorer(cfg, tmp_path / "s", prompts=ALL[:20], show_progress=False)
    assert {"acc_true", "acc_corrupted", "steps"} <= set(metrics)
    reward = make_reward("vqa", tmp_path / "s")
    images, caps = render_dataset(ALL[:20], 6, 16, seed=0)
    r = reward(to_float(images), caps)
    assert r.shape == (6,) and torch.all((r > 0) & (r < 1))
    again = VQAScorer.load(tmp_path / "s")
    torch.testing.assert_close(torch.sigmoid(again(to_float(images), caps)).double(), r)


def test_reward_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --reward-weights"):
        make_reward("vqa")
    with pytest.raises(FileNotFoundError, match="no VQA scorer"):
        make_reward("vqa", tmp_path)
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("nope")
    assert set(REWARDS) >= {"vqa", "checker", "clipscore", "vqascore"}


def test_clipscore_on_tiny_random_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from pgraft.apps.t2i.model import train_tokenizer

    tok = train_tokenizer(ALL, tmp_path / "clip")
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(str(tmp_path / "clip"))
    reward = CLIPScoreReward(tmp_path / "clip")
    images, caps = render_dataset(ALL, 4, 32, seed=0)
    r = reward(to_float(images), caps)
    assert r.shape == (4,) and torch.all(torch.isfinite(r)) and torch.all((r >= 0) & (r <= 2.5))
    with pytest.raises(FileNotFoundError, match="local CLIP directory"):
        CLIPScoreReward(tmp_path / "missing")
