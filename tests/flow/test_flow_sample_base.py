"""``pgraft flow sample/evaluate`` of a base model alone (issue 16, item 18), consistent with the other
apps: a base directory as the argument or as ``--base`` alone, ``--base`` still replacing the base of
a correct directory, and a directory that is neither refused in one line naming it. ``--base shipped``
samples the base shipped with the package into runs/flow/shipped-base (never into the package)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import invoke, ok
from test_flow_train import _fabricated_fashion


def _invoke(*args: str):
    return invoke("flow", *args)


def _ok(*args: str) -> str:
    return ok("flow", *args)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flow-base")
    data = _fabricated_fashion(root / "fashion")
    _ok("pretrain", "--data", "fashion-mnist", "--path", str(data), "--preset", "tiny", "--steps", "2",
        "--batch-size", "8", "--out", str(root / "base"), "--quiet")
    return root / "base"


def test_sample_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    by_argument = _ok("sample", str(tiny_base), "-n", "4", "--steps", "2", "--quiet")
    assert f"written to {tiny_base / 'samples.png'}" in by_argument and "base euler-2" in by_argument
    first = (tiny_base / "samples.png").read_bytes()
    (tiny_base / "samples.png").unlink()
    by_option = _ok("sample", "--base", str(tiny_base), "-n", "4", "--steps", "2", "--quiet")
    assert by_option == by_argument and (tiny_base / "samples.png").read_bytes() == first


def test_evaluate_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    common = ["--steps", "1", "--n", "4", "--reference-n", "8", "--classifier-steps", "2", "--no-inception",
              "--cache", str(tmp_path / "cache"), "--quiet"]
    _ok("evaluate", str(tiny_base), *common)
    row = pd.read_csv(tiny_base / "evaluation.csv")
    assert row["config"].tolist() == ["base euler-1"] and row["n_samples"].tolist() == [4]
    _ok("evaluate", "--base", str(tiny_base), "--out", str(tmp_path / "e.csv"), *common)
    assert pd.read_csv(tmp_path / "e.csv").equals(row)


def test_a_directory_that_is_neither_is_refused_in_one_line(tiny_base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("sample", "evaluate"):
        result, _ = _invoke(command, str(empty), "--quiet")
        lines = [line for line in result.output.splitlines() if "neither" in line]
        assert result.exit_code == 2 and len(lines) == 1 and str(empty) in lines[0], result.output
        assert ("neither a `pgraft flow correct` directory (no correct.json) nor a flow base model (no config.json)"
                in lines[0])
    other = tmp_path / "other"  # another model's checkpoint: refused before FlowUNet(**config) could fail
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class": "ToyDenoiser", "dim": 1}))
    torch.save({}, other / "model.safetensors")
    result, output = _invoke("sample", "--base", str(other), "--quiet")
    assert result.exit_code == 2 and "is a ToyDenoiser checkpoint, not a FlowUNet" in output
    assert "Traceback" not in output
    result, output = _invoke("sample", str(tiny_base), "--base", str(tiny_base), "--quiet")
    assert result.exit_code == 2 and "is a base itself" in output
    result, output = _invoke("sample", "--quiet")
    assert result.exit_code == 2
    assert "missing: give a `pgraft flow correct` directory or flow base model directory, or --base " in output
    assert not list(empty.iterdir())


def test_the_shipped_base_is_sampled_into_runs_not_into_the_package(tmp_path, monkeypatch):
    from pgraft.apps.flow.pretrain import APP

    if not APP.ships:
        result, output = _invoke("sample", "--base", "shipped", "--quiet")
        assert result.exit_code == 2 and "ships no flow base" in output
        return
    before = sorted(p.name for p in APP.shipped.iterdir())
    monkeypatch.chdir(tmp_path)
    _ok("sample", "--base", "shipped", "-n", "4", "--steps", "2", "--quiet")
    assert (tmp_path / "runs" / "flow" / "shipped-base" / "samples.png").is_file()
    assert sorted(p.name for p in APP.shipped.iterdir()) == before
