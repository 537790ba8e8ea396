"""The shapes-world base and its learned scorer ship with the package: ``pgraft t2i train`` in an
empty directory fine-tunes from them at once (no 45-minute pretraining), ``--base shipped`` samples
the base into runs/, and a missing ``--model`` directory is refused naming the command that makes one."""

from __future__ import annotations

import json

import pytest
from clitools import invoke

from pgraft.apps.t2i.presets import DEFAULT_MODEL, DEFAULT_SCORER, SHIPPED_BASE, SHIPPED_SCORER
from pgraft.core.shipped import SHIPPED, read_record, verify_shipped

pytestmark = pytest.mark.skipif(not SHIPPED_BASE.is_dir(), reason="this checkout ships no t2i base")

TINY_ROUND = ("--rounds", "1", "--groups", "2", "--m", "2", "--k", "1", "--train-steps", "1", "--batch-size", "2",
              "--sample-batch-size", "4", "--n-steps", "2", "--quiet")


def test_the_shipped_base_and_scorer_are_the_defaults_and_match_their_manifests():
    assert DEFAULT_MODEL == SHIPPED and DEFAULT_SCORER == SHIPPED
    for directory in (SHIPPED_BASE, SHIPPED_SCORER):
        verify_shipped(directory)
        assert read_record(directory)["command"].startswith("OMP_NUM_THREADS=1 pgraft t2i ")


def test_train_in_an_empty_directory_starts_from_the_shipped_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, output = invoke("t2i", "train", "--out", "run", *TINY_ROUND)
    assert result.exit_code == 0, output
    config = json.loads((tmp_path / "run" / "config.json").read_text())["app"]["t2i"]
    assert config["model"] == SHIPPED and config["reward"] == "vqa" and config["reward_weights"] == SHIPPED
    assert not (tmp_path / "runs").exists()  # nothing was pretrained
    result, output = invoke("t2i", "sample", "--base", "shipped", "--max-prompts", "1", "--per-prompt", "1",
                            "--quiet")
    assert result.exit_code == 0, output
    assert (tmp_path / "runs" / "t2i" / "shipped-base" / "samples" / "grid.png").is_file()  # not in the package


def test_a_missing_model_directory_names_the_command_that_makes_one(tmp_path):
    result, output = invoke("t2i", "train", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"),
                            *TINY_ROUND)
    assert result.exit_code == 2, output
    assert f"pgraft t2i pretrain --out {tmp_path / 'nothing'}" in output and "--model shipped" in output
    assert not (tmp_path / "r").exists()
