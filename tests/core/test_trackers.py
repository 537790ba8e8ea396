"""``--log-with`` (core/trackers.py, the round loop's tracker hook): TensorBoard's scalars are
exactly metrics.csv's columns at step = round, a resumed run continues the same event stream, the
app's PNGs are logged once each, and wandb in offline mode writes one run id across a resume."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from clitools import ok
from PIL import Image

from pgraft.core.trackers import RoundTracker, image_tag, row_scalars, run_config, tracking

SMALL = ("--groups", "4", "--m", "2", "--k", "1", "--train-steps", "2", "--batch-size", "4", "--rule", "topk",
         "--quiet")


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "trackers" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def expected_scalars(metrics: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    """``{"<phase>/<column>": [(round, value), ...]}`` of every filled numeric cell of metrics.csv."""
    out: dict[str, list[tuple[int, float]]] = {}
    for _, row in metrics.iterrows():
        for column, value in row.items():
            if column in ("round", "phase") or pd.isna(value):
                continue
            out.setdefault(f"{row['phase']}/{column}", []).append((int(row["round"]), float(value)))
    return out


def assert_scalars_equal_metrics(acc, metrics: pd.DataFrame) -> None:
    want = expected_scalars(metrics)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, g), (_, w) in zip(got, points):
            assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-7), (tag, g, w)  # float32 in the event file


def test_row_scalars_tags_by_phase_and_skips_the_step_and_text():
    row = {"round": 3, "phase": "eval", "reward_mean": 0.5, "accepted": 2, "note": "x", "train_loss": float("nan"),
           "flag": True}
    scalars = row_scalars(row)
    assert set(scalars) == {"eval/reward_mean", "eval/accepted", "eval/train_loss", "eval/flag"}
    assert scalars["eval/accepted"] == 2.0 and scalars["eval/flag"] == 1.0 and math.isnan(scalars["eval/train_loss"])


def test_image_tags_and_run_config_flattening(tmp_path):
    assert image_tag(tmp_path, tmp_path / "grids" / "round_0003.png") == "images/grids"
    assert image_tag(tmp_path, tmp_path / "samples.png") == "images/samples"
    (tmp_path / "config.json").write_text(json.dumps({"graft": {"rounds": 2, "grs": {"rule": "rs", "bound": None}},
                                                      "t": [0.5, 0.25]}))
    assert run_config(tmp_path) == {"graft.rounds": 2, "graft.grs.rule": "rs", "graft.grs.bound": "None",
                                    "t": "[0.5, 0.25]"}


@pytest.mark.extra("tensorboard")
def test_toy_run_logs_every_metrics_column_to_tensorboard_and_a_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    ok("toy", "train", *SMALL, "--rounds", "1", "--out", str(run), "--log-with", "tensorboard")
    assert_scalars_equal_metrics(events(run), pd.read_csv(run / "metrics.csv"))
    # the resumed run writes into the same event stream: rounds 1.. replace the first part's eval row
    ok("toy", "train", *SMALL, "--rounds", "2", "--resume", "--out", str(run), "--log-with", "tensorboard")
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["round"].tolist() == [0, 1, 2]
    assert_scalars_equal_metrics(events(run), metrics)


@pytest.mark.extra("tensorboard")
def test_pngs_the_app_writes_are_logged_once_each_at_their_round(tmp_path):
    def png(path, value):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((5, 7, 3), value, dtype=np.uint8)).save(path)

    png(tmp_path / "old.png", 10)  # there before the tracker: a resumed run's, logged by its first part
    with tracking("tensorboard", tmp_path) as tracker:
        png(tmp_path / "grids" / "round_0000.png", 50)
        tracker.log({"round": 0, "phase": "train", "reward_mean": 1.0})
        png(tmp_path / "grids" / "round_0001.png", 100)
        tracker.log({"round": 1, "phase": "train", "reward_mean": 2.0})
        png(tmp_path / "samples.png", 200)  # written after the loop (layout's samples.png): logged at the end
    acc = events(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["images/grids", "images/samples"]
    assert [(e.step, e.width, e.height) for e in acc.Images("images/grids")] == [(0, 7, 5), (1, 7, 5)]
    assert [e.step for e in acc.Images("images/samples")] == [1]
    decoded = np.asarray(Image.open(io.BytesIO(acc.Images("images/grids")[1].encoded_image_string)))
    assert (decoded == 100).all()


def test_none_opens_nothing_and_other_processes_log_nothing(tmp_path):
    with tracking("none", tmp_path) as tracker:
        assert tracker is None
    quiet = RoundTracker("tensorboard", tmp_path, main=False)
    quiet.log({"round": 0, "phase": "train", "reward_mean": 1.0})
    quiet.finish()
    assert not (tmp_path / "trackers").exists()


@pytest.mark.slow
@pytest.mark.extra("wandb")
def test_wandb_offline_writes_one_run_id_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    ok("toy", "train", *SMALL, "--rounds", "1", "--out", str(run), "--log-with", "wandb")
    run_id = json.loads((run / "trackers" / "tracker.json").read_text())["wandb_id"]
    runs = sorted((run / "trackers" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id) and (runs[0] / f"run-{run_id}.wandb").is_file()
    ok("toy", "train", *SMALL, "--rounds", "2", "--resume", "--out", str(run), "--log-with", "wandb")
    runs = sorted((run / "trackers" / "wandb" / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(run_id) for r in runs)  # the resumed part went on under the same id


@pytest.mark.extra("tensorboard")
def test_policy_gradient_rows_reach_the_tracker_opened_around_the_loop(tmp_path):
    from pgraft.apps.toy.train import ToyConfig, log_prob_fn, make_problem, pretrain_toy
    from pgraft.core.policy_gradient import PGConfig, run_policy_gradient

    toy = ToyConfig(n_steps=4, pretrain_steps=5, hidden=8, depth=1, n_data=64)
    base = pretrain_toy(toy, tmp_path / "base", show_progress=False).eval()
    cfg = PGConfig(rounds=2, groups=2, group_size=4, epochs=1, batch_size=8, lr=1e-3, sample_batch_size=8, seed=0)
    with tracking("tensorboard", tmp_path / "pg"):  # no tracker argument: the loop takes the current one
        _, table = run_policy_gradient(make_problem(toy), log_prob_fn(toy), base, toy.model_config(), cfg,
                                       tmp_path / "pg", show_progress=False)
    assert list(table["phase"]) == ["train", "train", "eval"]
    assert_scalars_equal_metrics(events(tmp_path / "pg"), pd.read_csv(tmp_path / "pg" / "metrics.csv"))
