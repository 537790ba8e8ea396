"""``pgraft flow sample/evaluate -n`` below 1: a usage error naming the flag, never a traceback."""

from __future__ import annotations

import pytest
from test_flow_train import _fabricated_fashion
from typer.testing import CliRunner

from pgraft.apps.flow.cli import app


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-n")
    data = _fabricated_fashion(root / "fashion")
    result = CliRunner().invoke(app, ["pretrain", "--data", "fashion-mnist", "--path", str(data), "--preset", "tiny",
                                      "--steps", "2", "--batch-size", "8", "--out", str(root / "base"), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "base"


@pytest.mark.parametrize("args", [["sample", "-n", "0"], ["sample", "--n", "-3"], ["evaluate", "-n", "0"],
                                  ["evaluate", "--n", "-3", "--no-inception"]])
def test_n_below_one_names_the_flag(tiny_base, tmp_path, args):
    command, *rest = args
    result = CliRunner().invoke(app, [command, str(tiny_base), *rest, "--cache", str(tmp_path / "cache"), "--quiet"]
                                if command == "evaluate" else [command, str(tiny_base), *rest, "--quiet"],
                                env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "'-n' / '--n'" in output and f"got {rest[1]}" in output and "Traceback" not in output
    assert not (tiny_base / "samples.png").exists() and not (tmp_path / "cache").exists()
