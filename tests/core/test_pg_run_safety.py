"""The policy-gradient baseline's run directory has the round loop's guarantees: one writer, a
checkpoint per round, --resume to the same rows and head as an uninterrupted run, clean stops on
SIGTERM, refused config changes, one final evaluation row."""

import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
from clitools import lock_held_by_another_process
from safetensors.torch import load_file

from pgraft.apps.toy.model import ToyDenoiser
from pgraft.apps.toy.train import ToyConfig, log_prob_fn, make_problem
from pgraft.core.errors import RunDirLocked, RunExistsError, UsageError
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient
from pgraft.core.pretrain import TrainingInterrupted

TOY = ToyConfig(n_steps=6)
MODEL = {"dim": 1, "hidden": 16, "depth": 2}
# 16 candidates in 2 sampling chunks a round; 2 epochs x 2 minibatches of 3 of the 6 steps
CFG = PGConfig(rounds=3, groups=4, group_size=4, epochs=2, batch_size=8, lr=1e-3, clip=0.2, sample_batch_size=8,
               timestep_fraction=0.5, seed=5)


def _base() -> ToyDenoiser:
    torch.manual_seed(0)
    return ToyDenoiser(**MODEL)


def _run(run_dir, cfg=CFG, problem=None, log_prob=None, **kwargs):
    return run_policy_gradient(problem or make_problem(TOY), log_prob or log_prob_fn(TOY), _base(), MODEL, cfg,
                               run_dir, show_progress=False, **kwargs)


def _rows_and_head(run_dir):
    """Metrics rows without wall times, and the head's weights."""
    return (pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds"]),
            load_file(str(run_dir / "head" / "model.safetensors")))


def _assert_same_run(a, b):
    ma, ha = _rows_and_head(a)
    mb, hb = _rows_and_head(b)
    pd.testing.assert_frame_equal(ma, mb)
    assert ha.keys() == hb.keys()
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("pg_uninterrupted")
    _run(out)
    return out


def _sigterm_on(fn, when, counted=lambda: True):
    """``fn`` that sends this process SIGTERM during its ``when``-th counted call."""
    calls = {"n": 0}

    def wrapped(*args):
        if counted():
            calls["n"] += 1
            if calls["n"] == when:
                os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args)
    return wrapped


# reward calls: 2 a round; log_prob calls with gradients (the updates): 4 minibatches x 3 steps a round
@pytest.mark.parametrize("hook, when, message", [
    ("reward", 1, "during round 0 (sampling); no round had finished"),
    ("reward", 4, "during round 1 (sampling); round 0 is saved"),
    ("update", 12 + 4, "during round 1 (policy update, after minibatch 2 of 4); round 0 is saved"),
    ("reward", 7, "during round 3 (final evaluation); rounds 0-2 are saved"),
])
def test_sigterm_stops_the_policy_gradient_cleanly_and_resume_matches(tmp_path, uninterrupted, hook, when, message):
    problem, log_prob = make_problem(TOY), log_prob_fn(TOY)
    if hook == "reward":
        problem.reward = _sigterm_on(problem.reward, when)
    else:
        log_prob = _sigterm_on(log_prob, when, torch.is_grad_enabled)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="rerun the same command with --resume") as info:
        _run(tmp_path, problem=problem, log_prob=log_prob)
    assert message in str(info.value)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not (tmp_path / "head").exists()
    if (tmp_path / "checkpoints" / "latest.json").exists():  # a committed round: a fresh start is refused
        with pytest.raises(RunExistsError, match="pass --resume"):
            _run(tmp_path)
    _run(tmp_path, resume=True)
    _assert_same_run(tmp_path, uninterrupted)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_lora_policy_resumes_to_the_uninterrupted_run(tmp_path):
    # LoRA adapters: the resumed run rebuilds them with the same seeded init, then loads the checkpoint
    cfg = PGConfig(**{**CFG.__dict__, "lora_rank": 2, "rounds": 2})
    _run(tmp_path / "whole", cfg)
    problem = make_problem(TOY)
    reward, calls = problem.reward, {"n": 0}

    def fails_in_round_1(x0, cond):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Stop()
        return reward(x0, cond)
    problem.reward = fails_in_round_1
    with pytest.raises(_Stop):
        _run(tmp_path / "cut", cfg, problem=problem)
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text()) == {"round": 0}
    assert any("lora_A" in k for k in load_file(str(tmp_path / "cut" / "checkpoints" / "round_0000" /
                                                    "weights.safetensors")))
    _run(tmp_path / "cut", cfg, resume=True)
    _assert_same_run(tmp_path / "cut", tmp_path / "whole")


def test_a_policy_with_dropout_resumes_to_the_uninterrupted_run(tmp_path):
    # dropout draws from torch's global generator while the policy trains: seeded per (seed, round),
    # so the rounds after a resume draw what they draw in the uninterrupted run
    def with_dropout():
        base = _base()
        base.net = torch.nn.Sequential(base.net[0], torch.nn.Dropout(0.3), *base.net[1:])
        return base

    def run(out, **kwargs):
        return run_policy_gradient(make_problem(TOY), log_prob_fn(TOY), with_dropout(), MODEL, CFG, out,
                                   show_progress=False, **kwargs)

    run(tmp_path / "whole")
    problem = make_problem(TOY)
    problem.reward = _sigterm_on(problem.reward, 5)  # round 2's sampling
    with pytest.raises(TrainingInterrupted):
        run_policy_gradient(problem, log_prob_fn(TOY), with_dropout(), MODEL, CFG, tmp_path / "cut",
                            show_progress=False)
    run(tmp_path / "cut", resume=True)
    _assert_same_run(tmp_path / "cut", tmp_path / "whole")


def test_the_final_evaluation_row_is_written_once(tmp_path):
    cfg = PGConfig(**{**CFG.__dict__, "rounds": 1})
    _run(tmp_path, cfg)
    before, head = _rows_and_head(tmp_path)
    _, table = _run(tmp_path, cfg, resume=True)  # a finished run: nothing left but the evaluation
    assert list(table["phase"]) == ["train", "eval"]
    after, head_after = _rows_and_head(tmp_path)
    pd.testing.assert_frame_equal(before, after)
    assert all(torch.equal(head[k], head_after[k]) for k in head)


def test_rounds_may_grow_on_resume_and_other_changes_are_refused(tmp_path, uninterrupted):
    _run(tmp_path, PGConfig(**{**CFG.__dict__, "rounds": 2}))
    config = (tmp_path / "config.json").read_text()
    for change, named in (({"clip": 0.3}, "pg.clip: saved 0.2, now 0.3"), ({"seed": 6}, "pg.seed"),
                          ({"rounds": 1}, "rounds may only grow")):
        with pytest.raises(UsageError, match=named):
            _run(tmp_path, PGConfig(**{**CFG.__dict__, **change}), resume=True)
        assert (tmp_path / "config.json").read_text() == config  # nothing was changed
    with pytest.raises(UsageError, match="only rounds, lr, epochs, grad_clip may change"):
        _run(tmp_path, PGConfig(**{**CFG.__dict__, "clip": 0.3}), resume=True)
    # the 2-round run's evaluation row is dropped, round 2 runs, and the run equals a 3-round one
    _run(tmp_path, CFG, resume=True)
    _assert_same_run(tmp_path, uninterrupted)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pg"]["rounds"] == 3
    assert saved["resumed"] == [{"at_round": 2, "changed": {"pg.rounds": [2, 3]}}]
    # a later resume with a changed learning rate is recorded too, the rows kept
    _run(tmp_path, PGConfig(**{**CFG.__dict__, "lr": 5e-4}), resume=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pg"]["lr"] == 5e-4 and saved["resumed"][-1] == {"at_round": 3, "changed": {"pg.lr": [1e-3, 5e-4]}}
    _assert_same_run(tmp_path, uninterrupted)


def test_a_second_writer_is_refused(tmp_path):
    run = tmp_path / "run"
    with lock_held_by_another_process(run) as pid:
        with pytest.raises(RunDirLocked, match=f"in use by PID {pid}"):
            _run(run)
        assert not (run / "config.json").exists()  # nothing was written


def test_the_run_directory_is_locked_while_the_policy_gradient_runs(tmp_path):
    problem = make_problem(TOY)
    reward, seen = problem.reward, []

    def probe(x0, cond):  # another process asks whether it may write the run: no, this one holds it
        out = subprocess.run([sys.executable, "-c", "import sys; from pgraft.core.integrity import held_by_another; "
                              "print(held_by_another(sys.argv[1]))", str(tmp_path)], capture_output=True, text=True)
        seen.append(out.stdout.strip())
        return reward(x0, cond)
    problem.reward = probe
    _run(tmp_path, PGConfig(**{**CFG.__dict__, "rounds": 1, "groups": 2, "final_eval": False}), problem=problem)
    assert seen and all(s.startswith(f"PID {os.getpid()}") for s in seen), seen


def test_several_processes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="one process"):
        _run(tmp_path)
    assert not (tmp_path / "config.json").exists()
