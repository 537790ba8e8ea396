"""Max-IoU bookkeeping (reference size used, coverage) and the two ``evaluate`` protocols:
``unconditional`` (default) and ``layoutdm`` (one class-clamped layout per test layout, every metric
against the full test split)."""

from __future__ import annotations

import re
from pathlib import Path

import clitools
import pandas as pd
import pytest
import torch

from pgraft.apps.layout.data import PUBLAYNET_CLASSES, Layouts, pack, synthetic_layouts
from pgraft.apps.layout.metrics import evaluate
from pgraft.apps.layout.train import (
    LayoutTrainConfig,
    evaluate_run,
    get_preset,
    load_base,
    pretrain_layout,
    sample_run,
    train_layout,
)
from pgraft.core.trainer import GraftConfig


def invoke(*args: str):
    """``pgraft layout ARGS`` in-process: (result, folded output)."""
    return clitools.invoke("layout", *args)


def ok(*args: str) -> str:
    return clitools.ok("layout", *args)


def _layouts(rows: list[list[tuple[int, float, float, float, float]]]) -> Layouts:
    return pack(rows, 4, PUBLAYNET_CLASSES)


# ----------------------------------------------------------------------------- metrics bookkeeping
def test_max_iou_ref_n_is_the_reference_size_used():
    gen = synthetic_layouts(12, "train", max_elements=6)
    ref = synthetic_layouts(30, "test", max_elements=6)
    for limit, gen_n, ref_n in ((1000, 12, 30), (None, 12, 30), (20, 12, 20), (5, 5, 5)):
        row = evaluate(gen, ref, None, max_iou_limit=limit)
        assert (row["max_iou_n"], row["max_iou_ref_n"]) == (gen_n, ref_n), limit
        assert row["n"] == 12 and "fid" not in row  # no feature net, no FID
    with pytest.raises(ValueError, match="max_iou_limit"):
        evaluate(gen, ref, None, max_iou_limit=0)


def test_max_iou_coverage_is_the_hand_counted_fraction():
    box = (0.5, 0.5, 0.2, 0.2)
    half = (0.5, 0.5, 0.2, 0.1)  # inside `box`, half its area: IoU 0.5
    reference = _layouts([[(0, *half)],                       # {text}
                          [(0, *box), (1, 0.5, 0.2, 0.2, 0.1)],  # {text, title}
                          [(1, *box), (1, 0.5, 0.8, 0.2, 0.1)]])  # {title, title}
    generated = _layouts([[(0, *box)],                        # {text}: in the reference
                          [(1, *box)],                        # {title}: not
                          [(1, 0.5, 0.2, 0.2, 0.1), (0, *box)],  # {title, text}: in (order is no matter)
                          [(2, *box)],                        # {list}: not
                          [(0, *box), (1, 0.9, 0.9, 0.1, 0.1)]])  # {text, title}: in, but a worse match
    row = evaluate(generated, reference, None)
    assert row["max_iou_coverage"] == pytest.approx(3 / 5)
    assert (row["max_iou_n"], row["max_iou_ref_n"]) == (5, 3)
    # matched pairs: {text} IoU 0.5; {text, title}: the exact copy (1.0) beats the other (0.5)
    assert row["max_iou"] == pytest.approx((0.5 + 1.0) / 2)
    # with the first 2 layouts of each set: generated {text}, {title}; reference {text}, {text, title}
    row = evaluate(generated, reference, None, max_iou_limit=2)
    assert row["max_iou_coverage"] == pytest.approx(1 / 2) and row["max_iou_ref_n"] == 2
    assert row["max_iou"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- protocols
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout-protocols") / "base"
    pretrain_layout(get_preset("tiny"), out, show_progress=False)
    return out


def test_layoutdm_protocol_clamps_the_test_labels_exactly(tiny_base, tmp_path):
    base = load_base(tiny_base)
    ref = base.reference()
    layouts, rewards, _ = sample_run(tiny_base, None, seed=3, show_progress=False, protocol="layoutdm")
    assert len(layouts) == len(ref) == get_preset("tiny").n_test and rewards.shape == (len(ref),)
    assert torch.equal(layouts.classes, ref.classes) and torch.equal(layouts.mask, ref.mask)
    assert torch.isfinite(layouts.boxes).all() and not torch.equal(layouts.boxes, ref.boxes)
    # a fine-tuned (here unconditional, P-GRAFT t = 0.5) run: head and base both keep the labels
    run = tmp_path / "run"
    train_layout(LayoutTrainConfig(base=str(tiny_base), preset="tiny", final_samples=0),
                 GraftConfig(rounds=1, groups=2, group_size=2, split=0.5, train_steps=1, batch_size=2),
                 run, show_progress=False)
    layouts, _, _ = sample_run(run, 7, show_progress=False, protocol="layoutdm")
    assert torch.equal(layouts.classes, ref.classes[:7]) and torch.equal(layouts.mask, ref.mask[:7])
    with pytest.raises(ValueError, match="one layout per test layout"):
        sample_run(run, len(ref) + 1, show_progress=False, protocol="layoutdm")


def test_layoutdm_row_is_against_the_full_test_split(tiny_base):
    n_test = get_preset("tiny").n_test
    row = evaluate_run(tiny_base, show_progress=False, protocol="layoutdm")
    assert row["protocol"] == "layoutdm" and row["n"] == n_test
    assert row["max_iou_n"] == row["max_iou_ref_n"] == n_test and row["max_iou_coverage"] == 1.0
    assert {"fid", "alignment", "overlap", "class_tv", "reward_mean"} <= set(row)
    assert row["class_tv"] == 0.0  # the same classes as the test split, element for element
    partial = evaluate_run(tiny_base, 10, show_progress=False, protocol="layoutdm")
    assert partial["n"] == 10 and partial["max_iou_ref_n"] == n_test and partial["max_iou_coverage"] == 1.0
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_run(tiny_base, 4, show_progress=False, protocol="layoutgan")


def test_cli_evaluate_prints_protocol_raw_scores_and_max_iou_sizes(tiny_base, tmp_path):
    n_test = get_preset("tiny").n_test
    out = ok("evaluate", str(tiny_base), "-n", "6", "--out", str(tmp_path / "u.csv"), "--quiet")
    row = pd.read_csv(tmp_path / "u.csv").iloc[0]
    assert row["protocol"] == "unconditional" and row["n"] == 6
    assert row["max_iou_n"] == 6 and row["max_iou_ref_n"] == n_test  # min(1000, test split)
    assert "alignment (raw; LayoutGAN++ prints ×100)" in out and "overlap (raw; LayoutGAN++ prints ×100)" in out
    assert re.search(rf"max_iou_coverage\W+[0-9.]+\W+max_iou_n\W+6\W+max_iou_ref_n\W+{n_test}\W", out), out
    assert f"6 generated vs {n_test} reference layouts" in out
    out = ok("evaluate", str(tiny_base), "--protocol", "layoutdm", "--out", str(tmp_path / "c.csv"),
             "--quiet")
    row = pd.read_csv(tmp_path / "c.csv").iloc[0]
    assert row["protocol"] == "layoutdm" and row["n"] == row["max_iou_ref_n"] == n_test
    assert row["max_iou_coverage"] == 1.0 and "layoutdm protocol" in out
    result, out = invoke("evaluate", str(tiny_base), "--protocol", "layoutgan", "--quiet")
    assert result.exit_code == 2 and "unknown protocol 'layoutgan'" in out
    result, out = invoke("evaluate", str(tiny_base), "--protocol", "layoutdm", "-n", str(n_test + 1),
                         "--quiet")
    assert result.exit_code == 2 and "one layout per test layout" in out and "Traceback" not in out
    result, out = invoke("evaluate", str(tiny_base), "-n", "0", "--quiet")
    assert result.exit_code == 2 and "must be at least 1" in out
