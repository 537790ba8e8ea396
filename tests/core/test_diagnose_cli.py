"""``pgraft <app> diagnose``: every app has it, a bad --t grid is a usage error naming the flag, and the toy
command runs end to end on its shipped base."""

from __future__ import annotations

import pandas as pd
import pytest
from clitools import invoke, ok

APPS = ("toy", "molecule", "layout", "t2i")


@pytest.mark.parametrize("app", APPS)
def test_diagnose_help(app):
    output = ok(app, "diagnose", "--help")
    for flag in ("--t", "--states", "--tails", "--seed", "--batch", "--out", "--reward"):
        assert flag in output, (app, flag)
    assert "0.1,0.25,0.5,0.75,0.9" in output


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("grid", ["0.5,abc", "0,0.5", "1.5", "0.1,,0.2"])
def test_a_bad_grid_is_a_usage_error_naming_the_flag(app, grid, tmp_path):
    result, output = invoke(app, "diagnose", "--t", grid, "--out", str(tmp_path / "d"), "--quiet")
    assert result.exit_code == 2, output
    assert "Invalid value for --t:" in output and "(0, 1]" in output and "Traceback" not in output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flag", ["--states", "--tails"])
def test_fewer_than_two_states_or_tails_is_a_usage_error(flag, tmp_path):
    result, output = invoke("toy", "diagnose", flag, "1", "--out", str(tmp_path / "d"), "--quiet")
    assert result.exit_code == 2 and f"'{flag}'" in output and "got 1" in output, output


def test_toy_diagnose_writes_its_table(tmp_path):
    output = ok("toy", "diagnose", "--states", "16", "--tails", "2", "--t", "0.5", "--out", str(tmp_path), "--quiet")
    assert "recommended t: 0.5 (" in output and "r2_lo" in output
    table = pd.read_csv(tmp_path / "diagnose.csv")
    assert table["t"].tolist() == [0.5] and table[["n_states", "tails"]].iloc[0].tolist() == [16, 2]
    assert (tmp_path / "diagnose.png").is_file()


@pytest.mark.slow
def test_the_probe_trains_a_lora_head_of_the_rank_given(tmp_path, monkeypatch):
    """--lora R reaches the learning probe as train's --lora does: the probe's config carries rank R, and
    the head it fine-tunes is a LoRA head (only adapter weights train)."""
    from pgraft.core import heads

    built = []
    real = heads.build_head

    def spy(base, cfg, init_seed=None):
        head = real(base, cfg, init_seed)
        built.append((cfg.lora_rank, sorted({n.split(".")[-3] for n, p in head.named_parameters() if p.requires_grad})))
        return head

    monkeypatch.setattr(heads, "build_head", spy)  # the probe imports it when it runs
    ok("toy", "diagnose", "--states", "16", "--tails", "2", "--t", "0.5", "--groups", "8", "--train-steps", "1",
       "--lora", "1", "--out", str(tmp_path), "--quiet")
    assert built and all(rank == 1 and names == ["lora_A", "lora_B"] for rank, names in built), built
    assert "--lora" in ok("molecule", "diagnose", "--help")


def test_lora_without_the_probe_is_a_usage_error_and_t2i_has_no_probe_flag(tmp_path):
    result, output = invoke("toy", "diagnose", "--lora", "1", "--states", "4", "--tails", "2", "--t", "0.5",
                            "--out", str(tmp_path / "d"), "--quiet")
    assert result.exit_code == 2 and "Invalid value for --lora" in output and "--train-steps" in output, output
    assert "Traceback" not in output and not (tmp_path / "d").exists()
    # refused before the command loads its base: a new --base directory is not pretrained into
    result, output = invoke("molecule", "diagnose", "--lora", "2", "--base", str(tmp_path / "base"),
                            "--out", str(tmp_path / "d"), "--quiet")
    assert result.exit_code == 2 and "Invalid value for --lora" in output, output
    assert not (tmp_path / "base").exists() and not (tmp_path / "d").exists()
    assert "--lora" not in ok("t2i", "diagnose", "--help")  # t2i's diagnose has no learning probe
