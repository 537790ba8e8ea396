"""The world's grammar and split, and the exact checker on rendered truth and on corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgraft.apps.t2i.checker import accuracy_table, check, detect
from pgraft.apps.t2i.rewards import corrupt_prompt
from pgraft.apps.t2i.world import (
    CATEGORIES,
    COLORS,
    NUMBERS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    SplitConfig,
    all_prompts,
    parse_prompt,
    render,
    render_dataset,
    sample_scene,
    split_prompts,
    to_float,
    to_uint8,
)

ALL = [s.text() for s in all_prompts()]


def test_grammar_round_trip_and_categories():
    assert len(set(ALL)) == len(ALL)
    for p in ALL:
        assert parse_prompt(p).text() == p
    assert {parse_prompt(p).category for p in ALL} == set(CATEGORIES)
    assert parse_prompt("  A photo of a Red circle. ").text() == "a photo of a red circle"


@pytest.mark.parametrize("bad", ["a photo of a dog", "a photo of a circle and a circle", "two circles", ""])
def test_parse_rejects_outside_grammar(bad):
    with pytest.raises(ValueError, match="grammar|twice"):
        parse_prompt(bad)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_holds_out_combinations_not_words(seed):
    split = split_prompts(SplitConfig(seed=seed))
    assert set(split.train).isdisjoint(split.heldout)
    assert sorted(split.train + split.heldout) == sorted(ALL)
    train_combos = set().union(*(parse_prompt(p).combinations() for p in split.train))
    assert not (train_combos & split.heldout_combinations), "a held-out combination occurs in training"
    for p in split.heldout:
        assert parse_prompt(p).combinations() & split.heldout_combinations
    words = {w for p in split.train for w in p.split()}
    assert set(SHAPES) | set(COLORS) | set(NUMBERS.values()) <= words | {s + "s" for s in SHAPES} | words
    assert all(r.split()[0] in words for r in RELATIONS)
    assert {parse_prompt(p).category for p in split.heldout} >= {"two_object", "counting", "colors", "position",
                                                                  "color_attr"}
    assert split_prompts(SplitConfig(seed=seed)) == split  # seeded


def test_render_is_seeded_and_in_range():
    a, _ = render_dataset(ALL, 20, 32, seed=3)
    b, _ = render_dataset(ALL, 20, 32, seed=3)
    assert torch.equal(a, b)
    x = to_float(a)
    assert x.shape == (20, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_checker_on_rendered_truth_is_exact():
    images, captions = render_dataset(ALL, 600, 32, seed=11)
    acc = check(to_float(images), captions).float().mean().item()
    assert acc >= 0.99


def test_checker_recovers_every_object():
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for color in COLORS:
            spec = PromptSpec("counting", (ObjectSpec(shape, color, 3),))
            objs = sample_scene(spec, 32, rng)
            found = detect(render(objs, 32))
            assert sorted((d.shape, d.color) for d in found) == [(shape, color)] * 3
            for o in objs:  # pixel centroids sit within ~1 px of the drawn centre (triangles: 0.3 r lower)
                assert min(abs(d.cx - o.cx) + abs(d.cy - o.cy - (0.3 * o.r if shape == "triangle" else 0))
                           for d in found) < 1.5


def test_checker_rejects_corrupted_captions_and_images():
    images, captions = render_dataset(ALL, 300, 32, seed=5)
    x = to_float(images)
    rng = np.random.default_rng(0)
    assert not check(x, [corrupt_prompt(c, rng) for c in captions]).any()
    blank = -torch.ones_like(x)
    assert not check(blank, captions).any()  # nothing drawn: nothing is correct
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert check(noisy, captions).float().mean() >= 0.98  # robust to moderate pixel noise


def test_accuracy_table_averages_categories():
    prompts = ["a photo of a circle", "a photo of a square", "a photo of two circles"]
    table = accuracy_table(prompts, [True, False, True], "m")
    assert table.loc["m", "single_object"] == 0.5 and table.loc["m", "counting"] == 1.0
    assert table.loc["m", "overall"] == pytest.approx(0.75)  # mean over present categories
    assert np.isnan(table.loc["m", "position"]) and table.loc["m", "n"] == 3
    with pytest.raises(ValueError, match="2 correctness"):
        accuracy_table(prompts, [True, False])


def test_uint8_float_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(pixels)), pixels)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # out-of-range values are clamped
