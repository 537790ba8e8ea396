"""``pgraft t2i diagnose`` on a tiny random Stable Diffusion pipeline (conftest), exact checker reward."""

from __future__ import annotations

import pandas as pd
import pytest
from clitools import invoke, ok


@pytest.mark.slow
def test_t2i_diagnose_runs_on_a_pipeline_directory(tiny_sd, tmp_path):
    output = ok("t2i", "diagnose", "--model", str(tiny_sd), "--reward", "checker", "--states", "6", "--tails", "2",
                "--t", "0.5,1", "--n-steps", "4", "--out", str(tmp_path), "--quiet")
    assert "recommended t:" in output
    assert pd.read_csv(tmp_path / "diagnose.csv")["t"].tolist() == [0.5, 1.0]


def test_t2i_diagnose_refuses_a_directory_without_a_pipeline(tmp_path):
    result, output = invoke("t2i", "diagnose", "--model", str(tmp_path), "--quiet")
    assert result.exit_code == 2 and "Invalid value for --model:" in output and "no unet/" in output, output
