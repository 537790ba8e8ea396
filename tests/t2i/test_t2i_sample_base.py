"""``pgraft t2i sample/evaluate`` of a base pipeline alone (issue 16, item 18): a base directory as the
argument or as ``--base``, and a directory that is neither a run nor a base refused in one line naming
it. t2i ships no base, so ``--base shipped`` says so."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import invoke, ok

from pgraft.apps.t2i.train import PretrainT2IConfig, load_pipeline, pretrain_world, sample_images
from pgraft.core.state import load_state

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


def _invoke(*args: str):
    return invoke("t2i", *args)


def _ok(*args: str) -> str:
    return ok("t2i", *args)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t2i-base")
    pretrain_world(PretrainT2IConfig(preset="tiny", steps=8, n_images=64, batch_size=8, warmup=2), root / "base",
                   show_progress=False)
    return root / "base"


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_sample_a_base_directory_as_argument_or_base_option(tiny_base, prompt_file, tmp_path):
    args = ["--prompts", str(prompt_file), "--per-prompt", "2", "--seed", "3", "--quiet"]
    _ok("sample", str(tiny_base), *args)
    images = load_state(tiny_base / "samples" / "images.safetensors")
    assert images.shape[0] == 4 and (tiny_base / "samples" / "grid.png").is_file()
    # the plain base sampler: the base pipeline alone, `train`'s default DDIM (20 steps, eta 1)
    pipe = load_pipeline(tiny_base)
    expected, _ = sample_images(pipe, pipe.denoiser, PROMPTS, 2, 0.0, 20, 1.0, 3, show_progress=False)
    assert torch.allclose(images, expected, atol=1e-6)

    _ok("sample", "--base", str(tiny_base), "--out", str(tmp_path / "s"), *args)
    assert torch.equal(load_state(tmp_path / "s" / "images.safetensors"), images)


def test_evaluate_a_base_directory_as_argument_or_base_option(tiny_base, prompt_file, tmp_path):
    args = ["--prompts", str(prompt_file), "--per-prompt", "1", "--reward", "checker", "--n-steps", "3", "--quiet"]
    _ok("evaluate", str(tiny_base), *args)
    table = pd.read_csv(tiny_base / "eval" / "accuracy.csv")
    assert table.iloc[0, 0] == "base" and "mean_checker" in table.columns
    _ok("evaluate", "--base", str(tiny_base), "--out", str(tmp_path / "e"), *args)
    assert pd.read_csv(tmp_path / "e" / "accuracy.csv").equals(table)


def test_a_directory_that_is_neither_run_nor_base_is_refused_in_one_line(tiny_base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("sample", "evaluate"):
        result, _ = _invoke(command, str(empty), "--quiet")
        lines = [line for line in result.output.splitlines() if "neither" in line]
        assert result.exit_code == 2 and len(lines) == 1 and str(empty) in lines[0], result.output
        assert "neither a t2i run (no config.json) nor a t2i base model (no unet/)" in lines[0]
    result, output = _invoke("evaluate", "--base", str(tiny_base), "--run", str(empty), "--quiet")
    assert result.exit_code == 2 and f"not --base {tiny_base} and --run {empty}" in output
    assert not list(empty.iterdir())
