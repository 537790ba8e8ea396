"""One check shared by the flow families' tests: the 2-process run accepts what the 1-process run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def assert_two_processes_accept_alike(model_dir: Path, tmp_path: Path, extra: tuple[str, ...] = (), n_steps: int = 4) -> None:
    """`pgraft t2i train` on ``model_dir`` under torchrun with 2 processes (each samples and scores its own
    seeded chunks; GRS decides on the gathered rewards) accepts the same images, with the same rewards, as
    one process. The reward is a user function (mean brightness), so that ties do not decide the set."""
    import os
    import shutil
    import subprocess
    import sys

    import pandas as pd

    (tmp_path / "brightness.py").write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    pgraft = shutil.which("pgraft")
    common = ["t2i", "train", "--model", str(model_dir), *extra, "--prompts", "heldout",
              "--reward", str(tmp_path / "brightness.py") + ":score", "--rounds", "1", "--groups", "4",
              "--group-size", "4", "--top-k", "1", "--split", "0.5", "--train-steps", "1", "--batch-size", "2",
              "--n-steps", str(n_steps), "--lora", "2", "--sample-batch-size", "4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([pgraft, *common, "--out", str(tmp_path / "one")], check=True, env=env, cwd=tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    subprocess.run([*torchrun, pgraft, *common, "--out", str(tmp_path / "two")], check=True, env=env, cwd=tmp_path)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    one, two = (pd.read_parquet(tmp_path / run / "store" / "round_0000.parquet") for run in ("one", "two"))
    assert len(one) == 4 and one["reward"].nunique() == 4  # one image per group, distinct rewards: no ties
    pd.testing.assert_frame_equal(one, two)
    metrics = [pd.read_csv(tmp_path / run / "metrics.csv").iloc[0] for run in ("one", "two")]
    for column in ("reward_mean", "reward_std", "accepted_reward_mean"):  # every candidate scored alike
        assert metrics[0][column] == pytest.approx(metrics[1][column], rel=1e-6)
