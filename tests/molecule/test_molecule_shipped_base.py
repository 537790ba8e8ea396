"""The molecule base shipped with the package: it samples valid molecules, `train` uses it by default
(and records it so a run is sampled with the same base), and `--base DIR` still loads or pretrains DIR."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pgraft.apps.molecule import diffusion
from pgraft.apps.molecule import train as mtrain
from pgraft.apps.molecule.cli import app
from pgraft.apps.molecule.data import QM9_SPEC, GraphSpec, load_dataset, state_to_smiles
from pgraft.apps.molecule.presets import get_preset
from pgraft.apps.molecule.pretrain import load_base, pretrain_molecule
from pgraft.core.errors import UsageError
from pgraft.core.grs import GRSConfig
from pgraft.core.shipped import SHIPPED, BaseChanged, read_record, weights_sha256
from pgraft.core.trainer import GraftConfig

torch.set_num_threads(1)

TINY_SMILES = ["CCO", "CC(=O)O", "c1ccoc1", "CC#N", "OCC=O", "NC(=O)C", "C1CC1O", "CC(C)O", "FC(F)F", "C=CC=O",
               "CNC", "OC1CC1", "CCCN", "O=CC=O"]
TINY_GRAFT = GraftConfig(rounds=1, groups=3, group_size=2, grs=GRSConfig(rule="topk", k=1), train_steps=2, batch_size=3,
                         sample_batch_size=8, split=0.5, final_eval=False)


def tiny_data(tmp_path: Path):
    path = tmp_path / "tiny.smi"
    path.write_text("\n".join(TINY_SMILES) + "\n")
    return load_dataset(path, cache_dir=tmp_path / "cache", spec=GraphSpec(atom_types=QM9_SPEC.atom_types, max_nodes=5),
                        fractions=(0.6, 0.2, 0.2))


@pytest.mark.slow
def test_the_shipped_base_samples_at_least_85_percent_valid_molecules():
    """The recorded protocol (1,000 molecules, 100 sampling steps, seed 0: ~30 s on one thread)
    gives validity >= 0.85 and reproduces the SHIPPED.json row (0.859) up to a few molecules that
    another CPU's floating point may flip. 1,000 samples put the standard error of a validity near
    0.86 at 0.011, so a base that lost its chemistry (0.80 after 1,800 steps) cannot pass."""
    base_dir = mtrain.APP.resolve_base(SHIPPED, "default")
    base, recorded = load_base(base_dir), read_record(base_dir)["eval"]
    x = diffusion.sample_graphs(base.model, 1000, base.size_distribution, recorded["sample_steps"],
                                torch.Generator().manual_seed(base.preset.seed))
    smiles = state_to_smiles(x, base.spec.atom_types)
    valid = [s for s in smiles if s is not None]
    assert len(valid) / 1000 >= 0.85, len(valid)
    assert abs(len(valid) - recorded["n_valid"]) <= 10
    assert len(set(valid)) / len(valid) >= 0.99  # not one molecule repeated


def test_the_shipped_base_is_the_default_preset_made_by_pretrain():
    base_dir = mtrain.APP.shipped
    record = read_record(base_dir)
    assert "pgraft molecule pretrain --out" in record["command"] and record["seed"] == 0
    assert record["eval"]["validity"] >= 0.85
    base = load_base(base_dir)
    assert base.preset == get_preset("default")
    assert sum(p.numel() for p in base.model.parameters()) < 1_000_000


def _cli_cfg(monkeypatch, *args) -> mtrain.MoleculeTrainConfig:
    seen = {}
    monkeypatch.setattr(mtrain, "train_molecule", lambda cfg, graft, out, **kw: seen.update(cfg=cfg))
    result = CliRunner().invoke(app, ["train", "--dedup", "--quiet", *args])
    assert result.exit_code == 0, result.output
    return seen["cfg"]


def test_train_defaults_to_the_shipped_base_and_takes_a_directory(monkeypatch, tmp_path):
    cfg = _cli_cfg(monkeypatch)
    assert cfg.base == SHIPPED and mtrain.APP.resolve_base(cfg.base, cfg.preset) == mtrain.APP.shipped
    cfg = _cli_cfg(monkeypatch, "--base", str(tmp_path / "mine"), "--preset", "tiny")
    assert mtrain.APP.resolve_base(cfg.base, cfg.preset) == tmp_path / "mine"
    with pytest.raises(UsageError, match="'default' preset, not 'tiny'"):
        mtrain.APP.resolve_base(SHIPPED, "tiny")


def test_train_refuses_a_damaged_shipped_base_in_one_line_naming_the_file(monkeypatch, tmp_path):
    copy = tmp_path / "default"
    shutil.copytree(mtrain.APP.shipped, copy)
    data = bytearray((copy / "molecule.json").read_bytes())
    data[10] ^= 0x01
    (copy / "molecule.json").write_bytes(bytes(data))
    monkeypatch.setattr(mtrain, "APP", replace(mtrain.APP, shipped=copy))
    monkeypatch.setattr(mtrain, "train_molecule", lambda *a, **k: pytest.fail("trained on a damaged base"))
    result = CliRunner().invoke(app, ["train", "--quiet", "--out", str(tmp_path / "run")], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    message = [line for line in result.output.splitlines() if "damaged" in line]
    assert len(message) == 1 and "molecule.json does not match its checksum" in message[0], result.output


def test_base_dir_is_pretrained_when_empty_then_loaded_and_recorded_for_sampling(monkeypatch, tmp_path):
    data = tiny_data(tmp_path)
    pretrained = []

    def tiny_pretrain(preset, run_dir, show_progress=True, **kw):  # the preset's pretraining, on tiny data
        pretrained.append(preset)
        return pretrain_molecule(preset, run_dir, data=data, show_progress=False)

    monkeypatch.setattr(mtrain, "pretrain_molecule", tiny_pretrain)
    monkeypatch.setattr(mtrain, "write_outputs", lambda *a, **k: None)
    mine = tmp_path / "mine"
    cfg = mtrain.MoleculeTrainConfig(base=str(mine), preset="tiny", sample_steps=4, final_samples=4)
    mtrain.train_molecule(cfg, TINY_GRAFT, tmp_path / "run1", show_progress=False)
    assert pretrained == [get_preset("tiny")] and (mine / "model.safetensors").is_file()
    mtrain.train_molecule(cfg, TINY_GRAFT, tmp_path / "run2", show_progress=False)
    assert len(pretrained) == 1  # the second run loads DIR

    recorded = json.loads((tmp_path / "run2" / "config.json").read_text())["app"]["molecule"]
    assert recorded["base"] == str(mine) and recorded["base_sha256"] == weights_sha256(mine)
    _, _, app_cfg, base, _ = mtrain.load_run(tmp_path / "run2")
    assert app_cfg.base_sha256 == recorded["base_sha256"] and base.spec == data.spec

    # a run recorded before base digests were kept resumes (its digest stays unknown, not refused)
    path = tmp_path / "run2" / "config.json"
    config = json.loads(path.read_text())
    del config["app"]["molecule"]["base_sha256"]
    path.write_text(json.dumps(config))
    mtrain.train_molecule(cfg, replace(TINY_GRAFT, rounds=2), tmp_path / "run2", resume=True, show_progress=False)
    assert json.loads(path.read_text())["app"]["molecule"].get("base_sha256") is None

    (mine / "model.safetensors").write_bytes((mine / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BaseChanged, match="sampling it would pair"):
        mtrain.load_run(tmp_path / "run1")


def test_a_run_on_the_shipped_base_records_it_and_samples_with_it(monkeypatch, tmp_path):
    monkeypatch.setattr(mtrain, "write_outputs", lambda *a, **k: None)
    cfg = mtrain.MoleculeTrainConfig(sample_steps=3, final_samples=4)
    graft = replace(TINY_GRAFT, train_steps=1)
    mtrain.train_molecule(cfg, graft, tmp_path / "run", show_progress=False)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["app"]["molecule"]
    assert recorded["base"] == SHIPPED
    assert recorded["base_sha256"] == read_record(mtrain.APP.shipped)["weights_sha256"]
    _, _, _, base, head = mtrain.load_run(tmp_path / "run")
    assert base.preset == get_preset("default")
