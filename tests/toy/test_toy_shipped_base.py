"""The toy base shipped with the package: it is the 1-D mixture, `toy train` uses it by default and
records it, `toy sample` of such a run finds it again, and other settings need `--base DIR`."""

from __future__ import annotations

import json

import pandas as pd
import torch
from typer.testing import CliRunner

from pgraft.apps.toy.data import MIXTURES
from pgraft.apps.toy.metrics import wasserstein_1d
from pgraft.apps.toy.model import ToyDenoiser
from pgraft.apps.toy.train import APP, ToyConfig, make_problem
from pgraft.cli import app
from pgraft.core.checkpoint import load_pretrained
from pgraft.core.sampling import sample
from pgraft.core.shipped import SHIPPED, read_record, weights_sha256

torch.set_num_threads(1)


def test_the_shipped_toy_base_samples_the_1d_mixture():
    """The record's protocol (20,000 base samples, seed 0, against 20,000 mixture samples, seed 1)
    gives W1 < 0.06 and reproduces the recorded value; a base of the other mode weights or of too
    few steps is > 0.1 away (the two modes sit 3.5 apart)."""
    cfg = ToyConfig()
    base = load_pretrained(ToyDenoiser, APP.resolve_base(SHIPPED, cfg)).eval()
    problem = make_problem(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = sample(base, problem.prior(20000, g), problem.times, problem.step, generator=g)
    target = MIXTURES["1d"].sample(20000, torch.Generator().manual_seed(1))
    w1 = wasserstein_1d(x, target)
    assert w1 < 0.06
    assert abs(w1 - read_record(APP.shipped)["eval"]["w1_to_mixture"]) < 0.005


def test_train_on_the_shipped_base_records_it_and_sample_finds_it(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["toy", "train", "--out", str(run), "--rule", "bon", "--m", "4", "--groups", "8",
                              "--train-steps", "3", "--t", "0.5", "--rounds", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    recorded = json.loads((run / "config.json").read_text())["app"]
    assert recorded["base"] == SHIPPED and recorded["base_sha256"] == weights_sha256(APP.shipped)
    res = runner.invoke(app, ["toy", "sample", str(run), "-n", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(run / "samples.csv")) == 5


def test_other_settings_need_a_base_directory(tmp_path):
    res = CliRunner().invoke(app, ["toy", "train", "--mixture", "2d", "--out", str(tmp_path / "x"), "--quiet"],
                             env={"COLUMNS": "400"})
    assert res.exit_code == 2 and "not mixture='2d'; pass --base DIR" in " ".join(res.output.split())
    assert APP.resolve_base(str(tmp_path / "mine"), ToyConfig(mixture="2d")) == tmp_path / "mine"
