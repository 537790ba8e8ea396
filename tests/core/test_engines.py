"""Distributed engines: the accelerate configs shipped in configs/accelerate load as accelerate reads
them, the round loop's engine helpers (core/trainer.py: sharded_engine, configure_engine,
full_weights, head_weights) do nothing to a one-process or data-parallel run, and, on a CUDA machine,
toy runs under DeepSpeed ZeRO-2/3 and FSDP produce the rows and head a one-process run does.

On the CPU accelerate runs an FSDP config as DDP (``use_cpu``: FSDP needs an accelerator device) and
DeepSpeed needs a CUDA build, so those runs are ``gpu`` tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from pgraft.core.trainer import GraftConfig, configure_engine, full_weights, head_weights, sharded_engine

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"


def test_shipped_accelerate_configs_load_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"):
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        kinds[name] = config.distributed_type.name
        assert config.num_machines == 1 and config.machine_rank == 0 and not config.use_cpu
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
                     "fsdp": "FSDP"}
    assert load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    zero3 = load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"]  # get_state_dict needs the 16-bit gather
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_use_orig_params"] and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def fake(kind: str, world: int = 4, **ds_config):
    plugin = SimpleNamespace(zero_stage=ds_config.pop("stage", 2), deepspeed_config=ds_config)
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=world,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_sharded_engine_names_only_engines_that_shard_the_state():
    assert sharded_engine(fake("NO")) is None and sharded_engine(fake("MULTI_CPU")) is None
    assert sharded_engine(fake("MULTI_GPU")) is None
    assert sharded_engine(fake("DEEPSPEED", stage=2)) == "deepspeed-2"
    assert sharded_engine(fake("DEEPSPEED", stage=3)) == "deepspeed-3"
    assert sharded_engine(fake("FSDP")) == "fsdp"


def test_configure_engine_fills_deepspeeds_auto_batch_and_clipping_from_the_graft_config():
    cfg = GraftConfig(batch_size=32, grad_clip=1.5)
    acc = fake("DEEPSPEED", world=4, train_micro_batch_size_per_gpu="auto", gradient_clipping="auto")
    configure_engine(acc, cfg)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (8, 32, 1.5)
    given = fake("DEEPSPEED", world=4, train_micro_batch_size_per_gpu=2, train_batch_size=8, gradient_clipping=0.5)
    configure_engine(given, cfg)  # values the user wrote stand
    ds = given.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (2, 8, 0.5)
    ddp = fake("MULTI_GPU")
    configure_engine(ddp, cfg)
    assert ddp.state.deepspeed_plugin.deepspeed_config == {}


def test_one_process_helpers_leave_the_model_as_it_is():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, opt = acc.prepare(nn.Linear(3, 2), torch.optim.AdamW(nn.Linear(1, 1).parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with full_weights(acc, model):
        out = model(torch.ones(1, 3))
    assert out.shape == (1, 2)
    weights = head_weights(acc, model, main=True)
    assert weights.keys() == before.keys() and all(torch.equal(weights[k], before[k]) for k in before)
    assert head_weights(acc, model, main=False) == {}  # DDP: only the main process saves


# ----------------------------------------------------------------------------- on a CUDA machine
TOY = ["toy", "train", "--rule", "topk", "--top-k", "1", "--group-size", "4", "--groups", "8", "--rounds", "2",
       "--train-steps", "3", "--batch-size", "8", "--quiet"]


def launch(config: Path | None, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if config is None:
        argv = [sys.executable, "-m", "pgraft.cli", *TOY, "--out", str(out), *extra]
    else:
        argv = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", str(config),
                "--num_processes", str(processes), "-m", "pgraft.cli", *TOY, "--out", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_toy_round_loop_under_a_sharded_engine_matches_one_process(engine, tmp_path):
    """One process under the engine: round 0 samples the same candidates (the head is the base
    before training) and accepts the same set; the rounds trained under the engine stay close to a
    plain run's, the checkpoint holds the whole head, and --resume is refused in one line."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    plain = launch(None, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    config = tmp_path / f"{engine}.yaml"
    data = yaml.safe_load((CONFIGS / f"{engine}.yaml").read_text())
    config.write_text(yaml.safe_dump({**data, "num_processes": 1}))
    run = launch(config, tmp_path / "engine")
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv").drop(columns="seconds") for d in ("plain", "engine"))
    pd.testing.assert_frame_equal(a.iloc[:1].drop(columns="train_loss"), b.iloc[:1].drop(columns="train_loss"))
    pd.testing.assert_frame_equal(a, b, rtol=1e-3, atol=1e-4)
    from safetensors.torch import load_file

    heads = [load_file(next((tmp_path / d / "head").glob("*.safetensors"))) for d in ("plain", "engine")]
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.allclose(heads[0][k], heads[1][k], rtol=1e-3, atol=1e-4) for k in heads[0])
    resumed = launch(config, tmp_path / "engine", "--resume", "--rounds", "3")
    assert resumed.returncode != 0 and "error: --resume under" in resumed.stderr  # the launcher exits 1
