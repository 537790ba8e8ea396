"""``pgraft layout sample/evaluate`` of a base model alone (issue 16, item 18): a base directory as the
argument or as ``--base``, the shipped base (outputs outside the package), and a directory that is
neither a run nor a base refused in one line naming it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from clitools import invoke, ok

from pgraft.apps.layout import train as ltrain
from pgraft.apps.layout.train import PRESET_NAME, get_preset, pretrain_layout
from pgraft.core.shipped import ship_base


def _invoke(*args: str):
    return invoke("layout", *args)


def _ok(*args: str) -> str:
    return ok("layout", *args)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout-base") / "base"
    pretrain_layout(get_preset("tiny"), out, show_progress=False)
    return out


def test_sample_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    by_argument = _ok("sample", str(tiny_base), "-n", "3", "--seed", "5", "--quiet")
    assert "3 layouts" in by_argument and (tiny_base / "sampled.png").stat().st_size > 0
    by_option = _ok("sample", "--base", str(tiny_base), "-n", "3", "--seed", "5", "--out", str(tmp_path / "b.png"),
                    "--quiet")
    assert (tmp_path / "b.png").read_bytes() == (tiny_base / "sampled.png").read_bytes()
    assert by_option.split("rendered")[0] == by_argument.split("rendered")[0]  # the same mean reward


def test_evaluate_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    _ok("evaluate", str(tiny_base), "-n", "4", "--quiet")
    row = pd.read_csv(tiny_base / "evaluation.csv").iloc[0]
    assert row["n"] == 4 and {"fid", "alignment", "overlap", "reward_mean"} <= set(row.index)
    _ok("evaluate", "--base", str(tiny_base), "-n", "4", "--out", str(tmp_path / "e.csv"), "--quiet")
    assert pd.read_csv(tmp_path / "e.csv").iloc[0].equals(row)


def test_the_shipped_base_is_sampled_into_runs_not_into_the_package(tiny_base, tmp_path, monkeypatch):
    files = ["config.json", "model.safetensors", PRESET_NAME, "features/config.json", "features/model.safetensors"]
    shipped = ship_base(tiny_base, tmp_path / "package" / "bases" / "default", files, {"command": "test"})
    monkeypatch.setattr(ltrain, "APP", replace(ltrain.APP, shipped=shipped))
    monkeypatch.chdir(tmp_path)
    _ok("sample", "--base", "shipped", "-n", "2", "--quiet")
    _ok("evaluate", str(shipped), "-n", "3", "--quiet")  # the package directory named as the argument
    outputs = Path("runs/layout/shipped-base")
    assert (outputs / "sampled.png").is_file() and pd.read_csv(outputs / "evaluation.csv")["n"].tolist() == [3]
    assert not (shipped / "sampled.png").exists() and not (shipped / "evaluation.csv").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_directory_that_is_neither_run_nor_base_is_refused_in_one_line(tiny_base, tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    result, _ = _invoke(command, str(empty), "--quiet")
    lines = [line for line in result.output.splitlines() if "neither" in line]
    assert result.exit_code == 2 and len(lines) == 1 and str(empty) in lines[0], result.output
    assert f"neither a layout run (no config.json) nor a layout base model (no {PRESET_NAME})" in lines[0]
    no_features = tmp_path / "no-features"  # a base without its FID feature net is no base
    no_features.mkdir()
    for name in ("config.json", "model.safetensors", PRESET_NAME):
        (no_features / name).write_bytes((tiny_base / name).read_bytes())
    result, output = _invoke(command, "--base", str(no_features), "--quiet")
    assert result.exit_code == 2 and "no features/model.safetensors" in output and "Traceback" not in output
    assert not list(empty.iterdir())
