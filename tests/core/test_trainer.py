import json
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pgraft.apps.toy.model import ToyDenoiser
from pgraft.apps.toy.train import ToyConfig, make_problem
from pgraft.core.grs import GRSConfig
from pgraft.core.pretrain import NonFiniteLossError
from pgraft.core.trainer import GraftConfig, run_graft

CFG = GraftConfig(rounds=3, groups=6, group_size=5, grs=GRSConfig(rule="topk", k=2), split=0.25, train_steps=4,
                  batch_size=7, lr=1e-3, sample_batch_size=8, seed=3)


def _base():
    torch.manual_seed(0)
    return ToyDenoiser(dim=1, hidden=16, depth=2)


def _problem():
    return make_problem(ToyConfig(n_steps=8))


def _store(run_dir):
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "store").glob("*.safetensors"))}


def test_round_loop_writes_store_metrics_and_head(tmp_path):
    _, table = run_graft(_problem(), _base(), {"dim": 1, "hidden": 16, "depth": 2}, CFG, tmp_path, show_progress=False)
    assert list(table["round"]) == [0, 1, 2, 3]
    assert list(table["phase"]) == ["train"] * 3 + ["eval"]
    assert (table["accepted"].iloc[:3] == 6 * 2).all()  # Top-2 of each of 6 groups
    store = _store(tmp_path)
    assert len(store) == 3 and all(s["x/__tensor__"].shape == (12, 1) for s in store.values())
    records = pd.read_parquet(tmp_path / "store" / "round_0001.parquet")
    assert list(records.columns[:3]) == ["round", "reward", "group"] and len(records) == 12
    assert (tmp_path / "head" / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()


def test_resume_after_kill_gives_the_same_store(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_graft(_problem(), _base(), {}, CFG, full, show_progress=False)

    problem = _problem()
    calls = {"n": 0}
    reward = problem.reward

    def dying_reward(x, c):
        calls["n"] += 1
        if calls["n"] == 9:  # dies while sampling round 2 (four chunks of 8 per round of 30)
            raise KeyboardInterrupt("simulated kill")
        return reward(x, c)

    problem.reward = dying_reward
    with pytest.raises(KeyboardInterrupt):
        run_graft(problem, _base(), {}, CFG, killed, show_progress=False)
    # also simulate a kill between the store write and the checkpoint of round 1
    shutil.rmtree(killed / "checkpoints" / "round_0001")
    (killed / "checkpoints" / "latest.json").write_text('{"round": 0}')
    with pytest.raises(FileExistsError, match="--resume"):
        run_graft(_problem(), _base(), {}, CFG, killed, show_progress=False)
    _, table = run_graft(_problem(), _base(), {}, CFG, killed, resume=True, show_progress=False)
    a, b = _store(full), _store(killed)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert list(table["round"]) == [0, 1, 2, 3]


def test_resume_refuses_a_changed_config(tmp_path):
    run_graft(_problem(), _base(), {}, CFG, tmp_path, show_progress=False)
    changed = GraftConfig(**{**CFG.__dict__, "split": 0.5})
    with pytest.raises(ValueError, match="split"):
        run_graft(_problem(), _base(), {}, changed, tmp_path, resume=True, show_progress=False)


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path):
    problem = _problem()
    loss, reward = problem.loss, problem.reward
    rewards_called = {"n": 0}

    def counting_reward(x, c):  # one chunk per round, so this counts rounds
        rewards_called["n"] += 1
        return reward(x, c)

    def nan_from_round_1(m, x, t, c, g):
        value = loss(m, x, t, c, g)
        return value * float("nan") if rewards_called["n"] >= 2 else value

    problem.reward, problem.loss = counting_reward, nan_from_round_1
    cfg = GraftConfig(**{**CFG.__dict__, "sample_batch_size": 64})
    with pytest.raises(NonFiniteLossError, match="round 1"):
        run_graft(problem, _base(), {}, cfg, tmp_path, show_progress=False)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text()) == {"round": 0}
    assert (tmp_path / "checkpoints" / "round_0000" / "weights.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "round_0001").exists()


def test_lora_fine_tunes_only_adapters(tmp_path):
    cfg = GraftConfig(**{**CFG.__dict__, "lora_rank": 2, "rounds": 1})
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    head, _ = run_graft(_problem(), base, {}, cfg, tmp_path, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base untouched
    assert set(head.state_dict()) == set(before)  # merged back into a plain model
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_toy_train_cli_end_to_end(tmp_path):
    from pgraft.cli import app

    args = ["toy", "train", "--out", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--rule", "bon",
            "--m", "4", "--groups", "16", "--train-steps", "5", "--t", "0.5", "--quiet"]
    env_steps = ["--rounds", "1"]
    runner = CliRunner()
    # a missing base model is pretrained first (tiny: we shorten it through the pretrain command)
    res = runner.invoke(app, ["toy", "pretrain", "--out", str(tmp_path / "base"), "--steps", "50", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, args + env_steps)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert table["accepted"].iloc[0] == 16
    res = runner.invoke(app, ["toy", "sample", str(tmp_path / "run"), "-n", "9", "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "run" / "samples.csv")) == 9
    res = runner.invoke(app, ["toy", "train", "--k", "9", "--m", "4", "--rule", "topk", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "k=9 exceeds" in res.output


@pytest.mark.slow
def test_two_processes_accept_the_same_set_as_one(tmp_path):
    """The README's two-process command (torchrun, 2 CPU processes) matches a 1-process run."""
    base = tmp_path / "base"
    common = ["toy", "train", "--base", str(base), "--rule", "topk", "--top-k", "2", "--group-size", "4", "--groups", "24",
              "--rounds", "1", "--train-steps", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pgraft = shutil.which("pgraft")
    subprocess.run([pgraft, "toy", "pretrain", "--out", str(base), "--steps", "20", "--quiet"], check=True, env=env)
    subprocess.run([pgraft, *common, "--out", str(tmp_path / "one")], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    subprocess.run([*torchrun, pgraft, *common, "--out", str(tmp_path / "two")], check=True, env=env)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    one, two = _store(tmp_path / "one"), _store(tmp_path / "two")
    for name in one:
        for k in one[name]:
            assert torch.equal(one[name][k], two[name][k])


def test_lora_targets_only_linear_layers_even_when_names_collide():
    from torch import nn

    from pgraft.core.trainer import apply_lora, merged_copy

    # "1.0" is a SiLU and "0.0" a Linear: suffix-based targeting would hit the SiLU
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.SiLU()), nn.Sequential(nn.SiLU(), nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    before = model(x).detach()
    lora = apply_lora(model, rank=2, alpha=2, targets=())
    assert sum("lora_A" in n for n, _ in lora.named_parameters()) == 2  # both Linear layers, nothing else
    assert torch.allclose(lora(x), before)  # LoRA B starts at zero
    assert set(merged_copy(lora).state_dict()) == set(nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.SiLU()), nn.Sequential(nn.SiLU(), nn.Linear(4, 2))).state_dict())


class _Constant(torch.nn.Module):
    """A model whose output is one learnable vector, whatever the input."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), value))

    def forward(self, x, s=None, cond=None):
        return self.w.expand(x.shape[0], 3)


@pytest.mark.parametrize("anchor", [0.0, 1.0, 3.0])
def test_anchor_shrinks_the_fit_toward_the_base_in_closed_form(anchor):
    # loss (w - 1)^2 + anchor (w - b)^2 with base b = 0 is minimised at w = 1 / (1 + anchor)
    from accelerate import Accelerator

    from pgraft.core.trainer import FineTuning, GraftProblem, _train

    problem = GraftProblem(prior=None, times=torch.linspace(1, 0, 3), step=None, reward=None,
                           loss=lambda model, x, t, cond, gen: (model(x, t, cond) - 1.0).square().mean())
    base, head = _Constant(0.0), _Constant(0.0)
    cfg = GraftConfig(train_steps=400, batch_size=4, lr=0.05, anchor=anchor, grad_clip=0.0)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    fit = FineTuning(problem, head, opt, base, cfg, 0.0, Accelerator(cpu=True), show_progress=False)
    out = _train(fit, torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), 0)
    assert torch.allclose(head.w, torch.full((3,), 1 / (1 + anchor)), atol=1e-3)
    assert ("anchor_penalty" in out) == (anchor > 0)
    assert torch.equal(base.w, torch.zeros(3))  # the base is never trained


def test_anchor_keeps_the_head_closer_to_the_base(tmp_path):
    x = torch.linspace(-3, 3, 41).view(-1, 1)

    def distance(anchor, run_dir):  # mean squared output difference on a grid of states and times
        cfg = GraftConfig(**{**CFG.__dict__, "anchor": anchor, "lr": 1e-2, "train_steps": 20})
        base = _base()
        head, table = run_graft(_problem(), base, {}, cfg, run_dir, show_progress=False)
        assert ("anchor_penalty" in table) == (anchor > 0)
        with torch.no_grad():
            return sum((head(x, torch.full((41,), s), None) - base(x, torch.full((41,), s), None)).square().mean()
                       for s in (0.3, 0.6, 0.9)).item()

    assert distance(10.0, tmp_path / "anchored") < 0.3 * distance(0.0, tmp_path / "free")


def test_negative_anchor_is_rejected():
    with pytest.raises(ValueError, match="anchor"):
        GraftConfig(anchor=-1.0)


def test_anchored_penalty_averages_every_output_of_dict_models():
    from pgraft.core.trainer import Anchored

    class Two(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(b))

        def forward(self, x):
            return {"velocity": self.a * x, "logits": (self.b * x, 2 * self.b * x)}

    x = torch.ones(4, 3)
    model = Anchored(Two(1.0, 1.0), Two(0.0, 0.5))
    out = model(x)
    assert torch.equal(out["velocity"], x)  # the head's output passes through
    # velocity: (1 - 0)^2 = 1; logits: mean of (1 - 0.5)^2 and (2 - 1)^2 = 0.625  ->  (1 + 0.625) / 2
    assert math.isclose(float(model.penalty), 0.8125)
    model(x)
    assert math.isclose(float(model.penalty), 2 * 0.8125)  # accumulates over calls until reset
    assert [n for n, _ in model.named_parameters()] == ["head.a", "head.b"]  # the base is not a submodule
