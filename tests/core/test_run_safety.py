"""Run-directory safety and crash consistency (audit items 2, 5-11 and 15): dedup without replay,
no unpickling of run files, one writer, verified checkpoints with fallback, the checkpoint as the
commit point of a round, clean stops on SIGTERM, refused resumes, one-line CLI errors."""

import json
import os
import signal

import pandas as pd
import pytest
import torch
from clitools import lock_held_by_another_process
from safetensors.torch import load_file
from test_trainer import CFG, _base, _problem  # the round-loop tests' small toy run
from torch import nn
from typer.testing import CliRunner

from pgraft.core.errors import CheckpointError, RunDirLocked, UsageError
from pgraft.core.grs import GRSConfig
from pgraft.core.integrity import exclusive, load_state_dict_file
from pgraft.core.pretrain import NonFiniteLossError, PretrainConfig, TrainingInterrupted, infinite_batches, pretrain
from pgraft.core.rundir import RunDir
from pgraft.core.trainer import GraftConfig, GraftProblem, run_graft


def _files(run_dir):
    """Store tensors + records, metrics rows (without timings) and head weights of a run."""
    store = {p.name: load_file(str(p)) for p in sorted((run_dir / "store").glob("*.safetensors"))}
    records = {p.name: pd.read_parquet(p) for p in sorted((run_dir / "store").glob("*.parquet"))}
    metrics = pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds"])
    head = load_file(str(run_dir / "head" / "model.safetensors"))
    return store, records, metrics, head


def _assert_same_run(a, b):
    sa, ra, ma, ha = _files(a)
    sb, rb, mb, hb = _files(b)
    assert sa.keys() == sb.keys() and ra.keys() == rb.keys()
    for name in sa:
        for k in sa[name]:
            assert torch.equal(sa[name][k], sb[name][k]), (name, k)
    for name in ra:
        pd.testing.assert_frame_equal(ra[name], rb[name])
    pd.testing.assert_frame_equal(ma, mb)
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k


# ----------------------------------------------------------------------------- item 2
class _Still(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, t=None, cond=None):
        return x * self.w


def _five_key_problem() -> GraftProblem:
    """Samples that never move (the step ignores the model), keyed into 5 classes."""
    return GraftProblem(
        prior=lambda n, g: torch.randn(n, 1, generator=g),
        times=torch.tensor([1.0, 0.0]),
        step=lambda model, x, t, t_next, cond, g: x,
        loss=lambda model, x, t, cond, g: model(x).square().mean(),
        reward=lambda x, cond: x[:, 0].double(),
        key=lambda x: [str(int(v * 3) % 5) for v in x[:, 0].abs().tolist()],
    )


@pytest.mark.parametrize("replay", [False, True])
def test_dedup_without_replay_trains_on_each_rounds_distinct_samples(tmp_path, replay):
    cfg = GraftConfig(rounds=3, groups=16, group_size=4, grs=GRSConfig(rule="bon"), dedup=True, replay=replay,
                      train_steps=2, batch_size=4, seed=0)
    _, table = run_graft(_five_key_problem(), _Still(), {}, cfg, tmp_path, show_progress=False)
    train = table[table["phase"] == "train"]
    assert (train["accepted"] == 16).all()
    kept = [pd.read_parquet(tmp_path / "store" / f"round_{r:04d}.parquet") for r in range(3)]
    for records in kept:
        assert records["key"].is_unique
    if replay:  # the store is the training set: no key twice in it
        assert pd.concat(kept)["key"].is_unique
    else:  # each round trains on its own distinct accepted keys, never on nothing
        assert all(len(r) > 0 for r in kept)
        assert train["train_loss"].notna().all()
        assert len(kept[2]) == train["kept_after_dedup"].iloc[2]


# ----------------------------------------------------------------------------- item 5
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unsafe_pickles_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    torch.save({"optimizer": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_a_tampered_trainer_state_is_refused_on_resume(tmp_path):
    run_graft(_problem(), _base(), {}, CFG, tmp_path, show_progress=False)
    marker = tmp_path / "pwned"
    for d in (tmp_path / "checkpoints").glob("round_*"):
        torch.save({"optimizer": _Evil(marker), "round": 0}, d / "trainer_state.pt")
        from pgraft.core.integrity import write_manifest  # a careful attacker fixes the checksums too

        write_manifest(d, ["weights.safetensors", "trainer_state.pt"])
    with pytest.raises(CheckpointError, match="trainer_state.pt cannot be loaded safely"):
        run_graft(_problem(), _base(), {}, GraftConfig(**{**CFG.__dict__, "rounds": 4}), tmp_path, resume=True,
                  show_progress=False)
    assert not marker.exists()


def test_a_tampered_pretraining_state_is_refused(tmp_path):
    cfg = PretrainConfig(steps=6, lr=1e-2, warmup=1, log_every=2, ckpt_every=3)
    data = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    loss = lambda m, x, c, g: m(x).square().mean()  # noqa: E731
    with pytest.raises(TrainingInterrupted):
        def stop_at_3(m, x, c, g):
            if stop_at_3.n == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            stop_at_3.n += 1
            return loss(m, x, c, g)
        stop_at_3.n = 0
        pretrain(nn.Linear(3, 3), infinite_batches(data, 4, 0), stop_at_3, cfg, tmp_path, {}, show_progress=False)
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker)}, tmp_path / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        pretrain(nn.Linear(3, 3), infinite_batches(data, 4, 0), loss, cfg, tmp_path, {}, show_progress=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- item 6


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    with lock_held_by_another_process(run) as pid:
        with pytest.raises(RunDirLocked, match=f"in use by PID {pid}"):
            run_graft(_problem(), _base(), {}, CFG, run, show_progress=False)
        assert not (run / "config.json").exists()  # nothing was written
        from pgraft.cli import app

        res = CliRunner().invoke(app, ["toy", "train", "--out", str(run), "--base", str(tmp_path / "b"), "--quiet"])
        assert res.exit_code == 1 and f"PID {pid}" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "b").exists()  # refused before the missing base would be pretrained
    # the holder died without releasing anything: its lock file is stale and the next run proceeds
    assert json.loads((run / ".lock").read_text())["pid"] == pid
    run_graft(_problem(), _base(), {}, GraftConfig(**{**CFG.__dict__, "rounds": 1}), run, show_progress=False)


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with exclusive(tmp_path):
        with exclusive(tmp_path):
            pass
        run_graft(_problem(), _base(), {}, GraftConfig(**{**CFG.__dict__, "rounds": 1}), tmp_path,
                  show_progress=False)


# ----------------------------------------------------------------------------- items 7 and 8
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("full")
    run_graft(_problem(), _base(), {}, CFG, path, show_progress=False)
    return path


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted, capsys):
    run_graft(_problem(), _base(), {}, GraftConfig(**{**CFG.__dict__, "rounds": 2}), tmp_path, show_progress=False)
    weights = tmp_path / "checkpoints" / "round_0001" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:] = bytes(200)  # zero the tail, header intact
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    run_graft(_problem(), _base(), {}, CFG, tmp_path, resume=True, show_progress=False)
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "round_0001/weights.safetensors does not match its checksum" in warning[0]
    assert "resuming from the checkpoint of round 0 instead" in warning[0], err
    _assert_same_run(uninterrupted, tmp_path)


def test_no_intact_checkpoint_names_every_file(tmp_path):
    run_graft(_problem(), _base(), {}, GraftConfig(**{**CFG.__dict__, "rounds": 2}), tmp_path, show_progress=False)
    for r in (0, 1):
        (tmp_path / "checkpoints" / f"round_{r:04d}" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        run_graft(_problem(), _base(), {}, CFG, tmp_path, resume=True, show_progress=False)
    assert "round_0000/weights.safetensors" in str(info.value) and "round_0001/weights.safetensors" in str(info.value)


@pytest.mark.parametrize("moment", ["after_metrics_row", "after_commit"])
def test_the_checkpoint_commits_the_metrics_row(tmp_path, uninterrupted, moment, monkeypatch):
    """Killed right after round 1's metrics row (before its checkpoint) or right after its commit:
    the resumed run has every row exactly once, as an uninterrupted run."""
    real = RunDir.append_metrics if moment == "after_metrics_row" else RunDir.save_checkpoint

    def dying(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if "train" in set(self.read_metrics().get("phase", [])) and len(self.read_metrics()) == 2:
            raise KeyboardInterrupt("simulated SIGKILL")
        return out

    monkeypatch.setattr(RunDir, real.__name__, dying)
    with pytest.raises(KeyboardInterrupt):
        run_graft(_problem(), _base(), {}, CFG, tmp_path, show_progress=False)
    monkeypatch.undo()
    run_graft(_problem(), _base(), {}, CFG, tmp_path, resume=True, show_progress=False)
    _assert_same_run(uninterrupted, tmp_path)


# ----------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("when", [3, 9])  # a fine-tuning step of round 0; a sampling chunk of round 2
def test_sigterm_stops_the_round_loop_cleanly_and_resume_matches(tmp_path, uninterrupted, when):
    problem = _problem()
    calls = {"n": 0}
    loss, reward = problem.loss, problem.reward
    hook = "loss" if when == 3 else "reward"

    def kill_on(fn):
        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == when:
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(*args)
        return wrapped

    if hook == "loss":
        problem.loss = kill_on(loss)
    else:
        problem.reward = kill_on(reward)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        run_graft(problem, _base(), {}, CFG, tmp_path, show_progress=False)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler
    phase = "fine-tuning, after step 3 of 4" if hook == "loss" else "sampling"
    assert f"during round {0 if hook == 'loss' else 2} ({phase})" in str(info.value)
    run_graft(_problem(), _base(), {}, CFG, tmp_path, resume=True, show_progress=False)
    _assert_same_run(uninterrupted, tmp_path)


# ----------------------------------------------------------------------------- items 10 and 11
def test_resume_refusals(tmp_path):
    with pytest.raises(UsageError, match="holds no run to resume"):
        run_graft(_problem(), _base(), {}, CFG, tmp_path / "missing", resume=True, show_progress=False)
    assert not (tmp_path / "missing").exists()
    run_graft(_problem(), _base(), {}, CFG, tmp_path, show_progress=False)
    config, metrics = (tmp_path / "config.json").read_text(), (tmp_path / "metrics.csv").read_text()
    with pytest.raises(UsageError, match="rounds 2, fewer than the saved run's 3"):
        run_graft(_problem(), _base(), {}, GraftConfig(**{**CFG.__dict__, "rounds": 2}), tmp_path, resume=True,
                  show_progress=False)
    assert (tmp_path / "config.json").read_text() == config and (tmp_path / "metrics.csv").read_text() == metrics


def test_after_a_nan_loss_resume_with_a_lower_lr_is_allowed_and_recorded(tmp_path):
    problem = _problem()
    loss = problem.loss
    poisoned = {"on": True}

    def nan_in_round_1(m, x, t, c, g):
        value = loss(m, x, t, c, g)
        return value * float("nan") if poisoned["on"] and (tmp_path / "checkpoints" / "round_0000").exists() else value

    problem.loss = nan_in_round_1
    with pytest.raises(NonFiniteLossError, match=r"lower the learning rate \(--lr\) and rerun with --resume"):
        run_graft(problem, _base(), {}, CFG, tmp_path, show_progress=False)
    poisoned["on"] = False
    _, table = run_graft(problem, _base(), {}, GraftConfig(**{**CFG.__dict__, "lr": 1e-4}), tmp_path, resume=True,
                         show_progress=False)
    assert list(table["round"]) == [0, 1, 2, 3]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["graft"]["lr"] == 1e-4
    assert saved["resumed"] == [{"at_round": 1, "changed": {"graft.lr": [1e-3, 1e-4]}}]


def _cli(*args):
    from pgraft.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


@pytest.mark.slow
def test_cli_refusals_are_one_line_without_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    res = _cli("toy", "train", "--out", tmp_path / "file", "--base", tmp_path / "b", "--quiet")
    assert res.exit_code == 2 and "is not a directory" in res.output
    res = _cli("toy", "train", "--out", tmp_path / "none", "--base", tmp_path / "b", "--resume", "--quiet")
    assert res.exit_code == 2 and "holds no run to resume" in res.output
    for res in (_cli("toy", "train", "--out", tmp_path / "file", "--base", tmp_path / "b", "--quiet"),
                _cli("toy", "train", "--out", tmp_path / "none", "--resume", "--quiet")):
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("flag,value,typed,internal", [("--m", 0, "--m", "group_size"), ("--t", 1.5, "--t", "split"),
                                                       ("--lora", -1, "--lora", "lora_rank"),
                                                       ("--alpha", 0, "--alpha", "alpha must")])
def test_validation_messages_name_the_flag_typed(tmp_path, flag, value, typed, internal):
    res = _cli("toy", "train", "--out", tmp_path / "run", flag, value, "--quiet")
    assert res.exit_code == 2
    assert typed in res.output and internal not in res.output, res.output


def test_resume_states_are_read_without_unpickling(tmp_path, monkeypatch):
    """A real trainer state (optimizer, generator, round) reads back equal to torch's own loader with pickle
    and torch.load disabled: resume files go through core.torch_checkpoint, never through an unpickler."""
    import pickle

    run_graft(_problem(), _base(), {}, CFG, tmp_path, show_progress=False)
    path = sorted((tmp_path / "checkpoints").glob("round_*"))[-1] / "trainer_state.pt"
    reference = torch.load(path, map_location="cpu", weights_only=True)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for name in ("Unpickler", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    state = load_state_dict_file(path)
    assert state.keys() == reference.keys() and state["round"] == reference["round"]
    flat = lambda obj: torch.cat([t.flatten().double() for t in _tensors(obj)])  # noqa: E731
    assert torch.equal(flat(state), flat(reference))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
