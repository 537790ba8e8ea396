"""``pgraft toy sample`` of a base model alone (issue 16, item 18): a base directory as the argument or
as ``--base``, the shipped base (outputs outside the package), and a directory that is neither a run
nor a base refused in one line naming it. (The toy has no ``evaluate``: its metric, W1 to the exact
GRS target, needs a run's rule and reward.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import invoke, ok

from pgraft.apps.toy import train as toy_train
from pgraft.apps.toy.model import ToyDenoiser
from pgraft.core.checkpoint import load_pretrained
from pgraft.core.shipped import ship_base
from pgraft.core.trainer import sample_finetuned


def _invoke(*args: str):
    return invoke("toy", *args)


def _ok(*args: str) -> str:
    return ok("toy", *args)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy-base")
    _ok("pretrain", "--out", str(root / "base"), "--mixture", "2d", "--steps", "5", "--quiet")
    return root / "base"


def test_sample_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    output = _ok("sample", str(tiny_base), "-n", "7", "--seed", "4", "--quiet")
    assert f"7 samples written to {tiny_base / 'samples.csv'}" in output
    by_argument = pd.read_csv(tiny_base / "samples.csv")
    assert list(by_argument.columns) == ["x0", "x1"] and len(by_argument) == 7  # the 2-d base's dimension
    # the plain base sampler: the base alone from T to 0, no head, no split
    model = load_pretrained(ToyDenoiser, tiny_base).eval()
    _, x0 = sample_finetuned(toy_train.base_problem(tiny_base), model, model, 7, 0.0, 4, show_progress=False)
    assert by_argument.to_numpy() == pytest.approx(x0.numpy(), rel=1e-6)  # float32 through CSV text

    _ok("sample", "--base", str(tiny_base), "-n", "7", "--seed", "4", "--out", str(tmp_path / "b.csv"), "--quiet")
    assert pd.read_csv(tmp_path / "b.csv").equals(by_argument)


def test_the_shipped_base_is_sampled_into_runs_not_into_the_package(tiny_base, tmp_path, monkeypatch):
    shipped = ship_base(tiny_base, tmp_path / "package" / "bases" / "default", ["config.json", "model.safetensors"],
                        {"command": "test"})
    monkeypatch.setattr(toy_train, "APP", replace(toy_train.APP, shipped=shipped))
    monkeypatch.chdir(tmp_path)
    _ok("sample", "--base", "shipped", "-n", "3", "--quiet")
    assert len(pd.read_csv("runs/toy/shipped-base/samples.csv")) == 3
    _ok("sample", str(shipped), "-n", "2", "--quiet")  # the package directory named as the argument
    assert len(pd.read_csv("runs/toy/shipped-base/samples.csv")) == 2
    assert sorted(p.name for p in shipped.iterdir()) == ["SHIPPED.json", "config.json", "manifest.json",
                                                         "model.safetensors"]


def test_a_directory_that_is_neither_run_nor_base_is_refused_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result, _ = _invoke("sample", str(empty), "--quiet")
    lines = [line for line in result.output.splitlines() if "neither" in line]
    assert result.exit_code == 2 and len(lines) == 1 and str(empty) in lines[0], result.output
    assert "neither a toy run (no config.json) nor a toy base model (no config.json)" in lines[0]

    other = tmp_path / "other"  # a checkpoint of another model is not a toy base
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class": "FlowUNet"}))
    torch.save({}, other / "model.safetensors")
    result, output = _invoke("sample", "--base", str(other), "--quiet")
    assert result.exit_code == 2 and "Traceback" not in output
    assert f"--base {other} is not a toy base model (its config.json is a FlowUNet checkpoint" in output
    result, output = _invoke("sample", str(tmp_path / "missing"), "--quiet")
    assert result.exit_code == 2 and f"{tmp_path / 'missing'} does not exist" in output
    assert not (empty / "samples.csv").exists() and not (other / "samples.csv").exists()


def test_the_word_shipped_names_the_shipped_base_as_argument_too(tmp_path, monkeypatch):
    """One way to name a base in every command: ``sample shipped`` is ``sample --base shipped`` (same
    samples), unless a directory called ``shipped`` exists where the command runs."""
    monkeypatch.chdir(tmp_path)
    as_option = _ok("sample", "--base", "shipped", "-n", "5", "--seed", "3", "--quiet", "--out", str(tmp_path / "a.csv"))
    as_argument = _ok("sample", "shipped", "-n", "5", "--seed", "3", "--quiet", "--out", str(tmp_path / "b.csv"))
    assert "5 samples written" in as_option and "5 samples written" in as_argument
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    (tmp_path / "shipped").mkdir()  # a directory of that name is what the argument names then
    result, output = _invoke("sample", "shipped", "-n", "5", "--quiet")
    assert result.exit_code == 2 and "shipped is neither a toy run" in output, output
