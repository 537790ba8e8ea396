"""``pgraft molecule sample/evaluate`` of a base model alone (issue 16, item 18): a base directory as the
argument or as ``--base``, the shipped base (outputs outside the package), and a directory that is
neither a run nor a base refused in one line naming it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import invoke, ok

from pgraft.apps.molecule import train as mtrain
from pgraft.apps.molecule.data import QM9_SPEC, GraphSpec, load_dataset
from pgraft.apps.molecule.presets import get_preset
from pgraft.apps.molecule.pretrain import META_NAME, load_base, pretrain_molecule
from pgraft.core.shipped import ship_base

torch.set_num_threads(1)

SMALL = ["CCO", "CC(=O)O", "c1ccoc1", "CC#N", "OCC=O", "NC(=O)C", "C1CC1O", "CC(C)O", "FC(F)F", "C=CC=O", "CNC"]


def _invoke(*args: str):
    return invoke("molecule", *args)


def _ok(*args: str) -> str:
    return ok("molecule", *args)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny preset pretrained on 11 molecules of at most 5 atoms (seconds)."""
    root = tmp_path_factory.mktemp("molecule-base")
    (root / "tiny.smi").write_text("\n".join(SMALL) + "\n")
    data = load_dataset(root / "tiny.smi", cache_dir=root / "cache", fractions=(0.6, 0.2, 0.2),
                        spec=GraphSpec(atom_types=QM9_SPEC.atom_types, max_nodes=5))
    pretrain_molecule(get_preset("tiny"), root / "base", data=data, show_progress=False)
    return root / "base"


def _plain_base_samples(base_dir: Path, n: int, seed: int) -> tuple[list, list]:
    """What the plain base sampler (no head, no split) draws: the reference for the CLI's CSV."""
    base = load_base(base_dir)
    problem = mtrain.make_problem(base, "qed", base.preset.sample_steps)
    smiles, rewards = mtrain.sample_smiles(problem, base.model, base.model, n, 0.0, seed, show_progress=False)
    return [s if isinstance(s, str) else "" for s in smiles], rewards.tolist()  # None / NaN: invalid


def test_sample_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    out = _ok("sample", str(tiny_base), "-n", "6", "--seed", "3", "--quiet")
    path = tiny_base / "sampled.csv"
    assert "6 molecules" in out and str(path) in out
    by_argument = pd.read_csv(path, keep_default_na=False)
    assert list(by_argument.columns) == ["smiles", "reward"] and len(by_argument) == 6
    smiles, rewards = _plain_base_samples(tiny_base, 6, 3)
    assert by_argument["smiles"].tolist() == smiles and by_argument["reward"].tolist() == pytest.approx(rewards)

    _ok("sample", "--base", str(tiny_base), "-n", "6", "--seed", "3", "--out", str(tmp_path / "b.csv"), "--quiet")
    assert pd.read_csv(tmp_path / "b.csv", keep_default_na=False).equals(by_argument)


def test_evaluate_a_base_directory_as_argument_or_base_option(tiny_base, tmp_path):
    _ok("evaluate", str(tiny_base), "-n", "5", "--no-fcd", "--quiet")
    row = pd.read_csv(tiny_base / "evaluation.csv").iloc[0]
    assert {"validity", "uniqueness", "reward_mean"} <= set(row.index) and 0 <= row["validity"] <= 1
    _ok("evaluate", "--base", str(tiny_base), "-n", "5", "--no-fcd", "--out", str(tmp_path / "e.csv"), "--quiet")
    assert pd.read_csv(tmp_path / "e.csv").iloc[0].equals(row)  # same seed, same base, same row


def test_the_shipped_base_is_sampled_into_runs_not_into_the_package(tiny_base, tmp_path, monkeypatch):
    shipped = ship_base(tiny_base, tmp_path / "package" / "bases" / "default",
                        ["config.json", "model.safetensors", META_NAME], {"command": "test"})
    monkeypatch.setattr(mtrain, "APP", replace(mtrain.APP, shipped=shipped))
    monkeypatch.chdir(tmp_path)
    _ok("sample", "--base", "shipped", "-n", "4", "--quiet")
    _ok("evaluate", "--base", "shipped", "-n", "4", "--no-fcd", "--quiet")
    outputs = Path("runs/molecule/shipped-base")
    assert len(pd.read_csv(outputs / "sampled.csv")) == 4 and (outputs / "evaluation.csv").is_file()
    _ok("sample", str(shipped), "-n", "3", "--quiet")  # the package directory named as the argument
    assert len(pd.read_csv(outputs / "sampled.csv")) == 3
    assert sorted(p.name for p in shipped.iterdir()) == sorted(["config.json", "model.safetensors", META_NAME,
                                                                "SHIPPED.json", "manifest.json"])


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_directory_that_is_neither_run_nor_base_is_refused_in_one_line(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    result, output = _invoke(command, str(empty), "--quiet")
    assert result.exit_code == 2 and "Traceback" not in output
    lines = [line for line in result.output.splitlines() if "neither" in line]
    assert len(lines) == 1 and str(empty) in lines[0], result.output
    assert "no config.json" in lines[0] and f"no {META_NAME}" in lines[0]
    result, output = _invoke(command, "--base", str(empty), "--quiet")
    assert result.exit_code == 2 and f"--base {empty} is not a molecule base model (no {META_NAME})" in output
    result, output = _invoke(command, str(empty), "--base", str(empty), "--quiet")
    assert result.exit_code == 2 and "not both" in output
    result, output = _invoke(command, "--quiet")
    assert result.exit_code == 2 and "missing: give a molecule run or molecule base model directory" in output
    assert not list(empty.iterdir())
