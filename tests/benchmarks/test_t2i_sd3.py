"""benchmarks/t2i_sd3.py: the learning-rate choice (argmax of the held-out reward on the selection
pipeline, ties to the smaller rate), how a run finds each method's rate, the equal-steps rule for
DiffusionNFT, and the known reward it scores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import t2i_sd3  # noqa: E402

from pgraft.apps.t2i.tiny import redness  # noqa: E402
from pgraft.core.errors import UsageError  # noqa: E402
from pgraft.core.state import write_sealed_json  # noqa: E402


def _long(means: dict[str, float]) -> pd.DataFrame:
    rows = []
    for key, mean in means.items():
        for seed, noise in ((0, -0.01), (1, 0.01)):
            rows.append({"method": key, "seed": seed, "metric": "reward", "value": mean + noise})
            rows.append({"method": key, "seed": seed, "metric": "drift", "value": 99.0})   # never chosen on
    return pd.DataFrame(rows)


def test_each_method_gets_its_best_rate_ties_to_the_smaller():
    lrs = [1e-3, 1e-2]
    means = {"base": 0.30}
    for i, key in enumerate(t2i_sd3.FINETUNED):
        means[f"{key}@0.001"] = 0.30 + 0.01 * i
        means[f"{key}@0.01"] = 0.30 + 0.01 * i + (0.005 if i % 2 else 0.0)   # odd methods: 0.01 wins; even: a tie
    args = argparse.Namespace(pipeline_seed=1, seeds="0,1")
    chosen, lines = t2i_sd3.select_lines(_long(means), lrs, args)
    assert chosen == {key: (1e-2 if i % 2 else 1e-3) for i, key in enumerate(t2i_sd3.FINETUNED)}
    assert lines[0].startswith("learning rate per method, chosen on the tiny pipeline of --pipeline-seed 1")
    assert lines[1] == "  GRAFT Top-2 of M: lr 0.001 (held-out reward at 0.001: 0.3000, 0.01: 0.3000)"
    assert lines[-1] == "  base: held-out reward 0.3000"
    del means[f"{t2i_sd3.FINETUNED[0]}@0.01"]
    with pytest.raises(SystemExit, match="graft_topk lacks cells"):
        t2i_sd3.select_lines(_long(means), lrs, args)


def test_a_run_takes_lr_for_all_else_the_selection_else_refuses(tmp_path):
    args = argparse.Namespace(lr=None, selection=tmp_path / "selection.json")
    with pytest.raises(SystemExit, match=r"--selection .*selection.json: no such file; run .*--select"):
        t2i_sd3.method_lrs(args)
    chosen = {key: 10.0 ** -(i + 2) for i, key in enumerate(t2i_sd3.FINETUNED)}
    write_sealed_json(args.selection, {"lr": chosen})
    assert t2i_sd3.method_lrs(args) == chosen
    assert t2i_sd3.method_lrs(argparse.Namespace(lr=3e-3, selection=args.selection)) == dict.fromkeys(chosen, 3e-3)
    args.selection.write_text(args.selection.read_text().replace("0.01", "0.02"))   # a changed choice
    with pytest.raises(UsageError, match="does not match its digest"):
        t2i_sd3.method_lrs(args)
    write_sealed_json(args.selection, {"lr": {"nft": 1e-3}})
    with pytest.raises(SystemExit, match="has no rate for graft_topk"):
        t2i_sd3.method_lrs(args)
    assert t2i_sd3.method_lrs(argparse.Namespace(select_lrs="1e-3", lr=None)) is None   # --select: in the methods


def test_nft_makes_the_same_optimizer_steps_or_the_run_is_refused():
    args = argparse.Namespace(groups=8, m=8, steps_per_round=8, batch_size=16)
    assert t2i_sd3.nft_epochs(args) == 2            # 2 passes over 64 images in batches of 16 = 8 steps
    args.batch_size = 12
    with pytest.raises(SystemExit, match=r"\(96\) must be a multiple of --groups x --m \(64\)"):
        t2i_sd3.nft_epochs(args)


def test_redness_is_red_minus_the_mean_of_green_and_blue():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0                       # pure red: 1 - 0
    images[1, 1], images[1, 2] = 0.5, -1.0   # green 0.5, blue -1: 0 - (0.5 - 1) / 2
    assert torch.allclose(redness(images, ["a", "b"]), torch.tensor([1.0, 0.25]))


@pytest.mark.slow
def test_select_then_run_end_to_end(tmp_path, capsys):
    """--select at toy sizes writes a sealed choice and its lines; the run reads it, records it in its
    settings and each cell's lr; a second --out with another choice would be another run."""
    sel = tmp_path / "sel"
    argv = ["--select", "--quick", "--select-lrs", "1e-3,1e-2", "--out", str(sel), "--quiet"]
    t2i_sd3.select_main(argv)
    choice = json.loads((sel / "selection.json").read_text())
    assert set(choice["lr"]) == set(t2i_sd3.FINETUNED) and set(choice["lr"].values()) <= {1e-3, 1e-2}
    assert (sel / "selection.txt").read_text().startswith("learning rate per method")
    run = tmp_path / "run"
    t2i_sd3.harness.main(t2i_sd3.BENCH, "doc", ["--quick", "--seeds", "0", "--out", str(run), "--quiet",
                                                 "--selection", str(sel / "selection.json"), "--methods", "base,nft"])
    settings = json.loads((run / "settings.json").read_text())["settings"]
    assert settings["lr"] == choice["lr"] and len(settings["pipeline_sha256"]) == 64
    cell = json.loads((run / "cells" / "nft" / "seed_0" / "cell.json").read_text())
    assert cell["extra"]["lr"] == choice["lr"]["nft"] and cell["metrics"]["drift"] > 0


def test_select_options_are_split_off_and_need_each_other():
    assert t2i_sd3.split_select(["--select", "--select-lrs=1e-3,1e-2", "--seeds", "0"]) == (True, "1e-3,1e-2", ["--seeds", "0"])
    assert t2i_sd3.split_select(["--seeds", "0,1"]) == (False, t2i_sd3.SELECT_LRS, ["--seeds", "0,1"])
    with pytest.raises(SystemExit, match="--select-lrs is an option of --select"):
        t2i_sd3.split_select(["--select-lrs", "1e-3"])


def test_an_incomplete_pipeline_folder_is_refused_not_loaded(tmp_path):
    (tmp_path / "pipeline_seed0" / "vae").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"pipeline_seed0 holds no complete pipeline \(no transformer/"):
        t2i_sd3.ensure_pipeline(tmp_path / "pipeline_seed0", 0)
