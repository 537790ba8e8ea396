"""``pgraft toy sample -n`` below 1: a usage error naming the flag, never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pgraft.cli import app


def _invoke(*args: str):
    result = CliRunner().invoke(app, ["toy", *args], env={"COLUMNS": "400"})
    return result, " ".join(result.output.split())


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-n")
    result, output = _invoke("pretrain", "--out", str(root / "base"), "--steps", "5", "--quiet")
    assert result.exit_code == 0, output + repr(result.exception)
    result, output = _invoke("train", "--out", str(root / "run"), "--base", str(root / "base"), "--rounds", "1",
                             "--groups", "4", "--train-steps", "2", "--quiet")
    assert result.exit_code == 0, output + repr(result.exception)
    return root / "run"


@pytest.mark.parametrize("n", ["0", "-5"])
def test_sample_n_below_one_names_the_flag(toy_run, n):
    result, output = _invoke("sample", str(toy_run), "-n", n, "--quiet")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "'-n'" in output and f"got {n}" in output and "Traceback" not in output
    assert not (toy_run / "samples.csv").exists()


def test_sample_n_one_still_works(toy_run):
    result, output = _invoke("sample", str(toy_run), "-n", "1", "--quiet")
    assert result.exit_code == 0, output
    assert "1 samples written" in output and (toy_run / "samples.csv").read_text().count("\n") == 2
