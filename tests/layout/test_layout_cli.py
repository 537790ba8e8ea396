"""Smoke: tiny pretrain + one GRAFT / P-GRAFT round + sample + evaluate through the CLI (seconds)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pgraft.apps.layout.cli import app
from pgraft.apps.layout.train import get_preset, load_base, log_prob_fn, make_problem, pretrain_layout
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("layout") / "base"
    pretrain_layout(get_preset("tiny"), out, show_progress=False)
    return out


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_cli_train_resume_sample_evaluate(tiny_base, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--base", str(tiny_base), "--preset", "tiny", "--reward", "alignment",
            "--rule", "topk", "--k", "1", "--m", "3", "--groups", "3", "--t", "0.5", "--rounds", "1",
            "--train-steps", "2", "--batch-size", "4", "--final-samples", "5", "--quiet"]
    _ok(runner.invoke(app, args))
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["phase"].tolist() == ["train", "eval"] and metrics.loc[0, "accepted"] == 3
    assert (run / "samples.png").is_file() and (run / "rounds.png").is_file()
    row = pd.read_csv(run / "evaluation.csv").iloc[0]
    assert row["n"] == 5 and {"fid", "alignment", "overlap", "max_iou", "class_tv"} <= set(row.index)
    # one more round on top of the first
    _ok(runner.invoke(app, [*args[:args.index("--rounds")], "--rounds", "2", *args[args.index("--rounds") + 2:],
                            "--resume"]))
    assert pd.read_csv(run / "metrics.csv")["round"].tolist() == [0, 1, 2]
    _ok(runner.invoke(app, ["sample", str(run), "-n", "3", "--quiet"]))
    assert (run / "sampled.png").stat().st_size > 0
    _ok(runner.invoke(app, ["evaluate", str(run), "-n", "4", "--out", str(tmp_path / "row.csv"), "--quiet"]))
    assert pd.read_csv(tmp_path / "row.csv")["n"].tolist() == [4]
    # the base directory evaluates too
    _ok(runner.invoke(app, ["evaluate", str(tiny_base), "-n", "4", "--quiet"]))


def test_cli_rejects_bad_choices(tiny_base, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--base", str(tiny_base), "--reward", "beauty"])
    assert r.exit_code != 0 and "unknown reward" in r.output
    r = runner.invoke(app, ["sample", str(tmp_path / "nowhere"), "--quiet"], env={"COLUMNS": "400"})
    assert r.exit_code != 0 and "no config.json" in " ".join(r.output.split())


def test_conditional_graft_keeps_conditions(tiny_base, tmp_path):
    from pgraft.apps.layout.train import LayoutTrainConfig, problem_for, sample_layouts, train_layout
    from pgraft.core.trainer import GraftConfig

    cfg = LayoutTrainConfig(base=str(tiny_base), preset="tiny", conditional=True, final_samples=0)
    train_layout(cfg, GraftConfig(rounds=1, groups=2, group_size=2, split=0.5, train_steps=1, batch_size=2),
                 tmp_path / "c", show_progress=False)
    base = load_base(tiny_base)
    problem = problem_for(cfg, base)
    layouts, _ = sample_layouts(problem, base.model, base.model, 5, 0.5, base.class_names, show_progress=False)
    expected = torch.stack(problem.conditions[:5])
    assert torch.equal(layouts.classes, expected) and torch.equal(layouts.mask, expected != -1)


def test_policy_gradient_baseline_runs(tiny_base, tmp_path):
    base = load_base(tiny_base)
    problem = make_problem(base, "overlap", box_noise=0.2)
    cfg = PGConfig(rounds=1, groups=2, group_size=3, batch_size=3, lr=1e-4, clip=0.2, final_eval=False)
    model, table = run_policy_gradient(problem, log_prob_fn(0.2), base.model, {}, cfg, tmp_path / "pg",
                                       show_progress=False)
    assert torch.isfinite(torch.tensor(table["train_loss"].tolist())).all()
