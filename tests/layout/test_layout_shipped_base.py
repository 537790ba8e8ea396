"""The layout base shipped with the package: it reproduces its recorded evaluation, `layout train`
uses it by default (and records it, so `sample` finds it again), and `--base DIR` still pretrains."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pgraft.apps.layout.cli import app
from pgraft.apps.layout.train import APP, LayoutTrainConfig, evaluate_run, get_preset, load_base
from pgraft.core.errors import UsageError
from pgraft.core.shipped import SHIPPED, read_record, weights_sha256

pytestmark = pytest.mark.skipif(not APP.ships, reason="this checkout ships no layout base")


@pytest.mark.slow
def test_the_shipped_layout_base_reproduces_its_recorded_evaluation():
    """`pgraft layout pretrain`'s own protocol (256 layouts, seed 0; ~15-20 s) on the shipped
    directory gives the row recorded in SHIPPED.json, up to floating-point noise of another CPU."""
    recorded = read_record(APP.shipped)["eval"]
    row = evaluate_run(APP.shipped, recorded["n"], show_progress=False)
    for key in ("alignment", "overlap", "class_tv", "fid"):
        assert row[key] == pytest.approx(recorded[key], rel=0.05, abs=1e-3), key
    assert load_base(APP.shipped).preset == get_preset("default")


def test_train_defaults_to_the_shipped_base_and_records_it(tmp_path):
    assert LayoutTrainConfig().base == SHIPPED and APP.resolve_base(LayoutTrainConfig().base, "default") == APP.shipped
    with pytest.raises(UsageError, match="'default' preset, not 'tiny'"):
        APP.resolve_base(SHIPPED, "tiny")
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(run), "--reward", "alignment", "--rule", "topk", "--k", "1",
                                 "--m", "2", "--groups", "2", "--t", "0.5", "--rounds", "1", "--train-steps", "1",
                                 "--batch-size", "2", "--sample-steps", "3", "--final-samples", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())["app"]["layout"]
    assert recorded["base"] == SHIPPED and recorded["base_sha256"] == weights_sha256(APP.shipped)
    result = runner.invoke(app, ["sample", str(run), "-n", "2", "--quiet"])
    assert result.exit_code == 0, result.output
