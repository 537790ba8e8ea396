"""Integrity of the accepted-sample store and resume hygiene: store digests committed with each
round's checkpoint (a deleted or changed store file is refused where it would be trained on, named
in a warning elsewhere, and a refusal changes nothing), an unreadable latest.json, temporary files
of killed writes, and the stop message."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_run_safety import _files, _five_key_problem, _Still
from test_trainer import CFG, _base, _problem  # the round-loop tests' small toy run

from pgraft.core.errors import CheckpointError
from pgraft.core.integrity import write_manifest
from pgraft.core.pretrain import TrainingInterrupted
from pgraft.core.rundir import RunDir
from pgraft.core.trainer import GraftConfig, run_graft

REPLAY = GraftConfig(**{**CFG.__dict__, "replay": True})


def _cfg(cfg, **changes):
    return GraftConfig(**{**cfg.__dict__, **changes})


def _hashes(run_dir):
    """SHA-256 of every file of a run directory (but the lock file), by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def _warnings(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


def _assert_same_except(a, b, skip=()):
    """Store files (but ``skip``), metrics rows without timings and head weights are equal."""
    sa, ra, ma, ha = _files(a)
    sb, rb, mb, hb = _files(b)
    assert sa.keys() == sb.keys() and ra.keys() == rb.keys()
    for name in set(sa) - set(skip):
        for k in sa[name]:
            assert torch.equal(sa[name][k], sb[name][k]), (name, k)
    for name in set(ra) - set(skip):
        pd.testing.assert_frame_equal(ra[name], rb[name])
    pd.testing.assert_frame_equal(ma, mb)
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k


@pytest.fixture(scope="module")
def replay_two_rounds(tmp_path_factory):
    """A replay run of 2 of CFG's 3 rounds (copied by each test that damages it)."""
    path = tmp_path_factory.mktemp("replay2")
    run_graft(_problem(), _base(), {}, _cfg(REPLAY, rounds=2), path, show_progress=False)
    return path


@pytest.fixture(scope="module")
def plain_two_rounds(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain2")
    run_graft(_problem(), _base(), {}, _cfg(CFG, rounds=2), path, show_progress=False)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("full")
    run_graft(_problem(), _base(), {}, CFG, path, show_progress=False)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shift(path):
    """Rewrite a store file as a valid safetensors with x[0] += 0.5."""
    tensors = load_file(str(path))
    tensors["x/__tensor__"][0] += 0.5
    save_file(tensors, str(path))


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {"deleted": lambda p: p.unlink(), "shifted": _shift, "bit flipped": _flip_bit, "truncated": _truncate}


# ----------------------------------------------------------------------------- replay: refused
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_file_is_refused_on_a_replay_resume_and_nothing_changes(tmp_path, replay_two_rounds,
                                                                                  damage):
    run = _copy(replay_two_rounds, tmp_path / "run")
    target = run / "store" / "round_0000.safetensors"
    DAMAGE[damage](target)
    before = _hashes(run)
    with pytest.raises(CheckpointError) as info:
        run_graft(_problem(), _base(), {}, REPLAY, run, resume=True, show_progress=False)
    message = str(info.value)
    assert str(target) in message and "\n" not in message
    assert "does not match the digest recorded at round 0 (deleted or changed since" in message
    assert "cannot replay round 0; start over in a new --out" in message
    assert _hashes(run) == before  # not even config.json (whose resume history rounds 2 -> 3 would change)


def test_a_changed_records_file_is_refused_with_dedup_and_replay(tmp_path):
    """dedup + replay reads every round's records (the keys seen so far): they are checked too."""
    cfg = GraftConfig(rounds=2, groups=16, group_size=4, dedup=True, replay=True, train_steps=2, batch_size=4)
    run = tmp_path / "run"
    run_graft(_five_key_problem(), _Still(), {}, cfg, run, show_progress=False)
    records = run / "store" / "round_0000.parquet"  # 5 distinct keys (round 1 finds no new one)
    table = pd.read_parquet(records)
    table.loc[0, "reward"] += 1.0
    table.to_parquet(records, index=False)
    before = _hashes(run)
    with pytest.raises(CheckpointError, match=r"round_0000\.parquet does not match the digest recorded at round 0"):
        run_graft(_five_key_problem(), _Still(), {}, _cfg(cfg, rounds=3), run, resume=True, show_progress=False)
    assert _hashes(run) == before


def test_store_reads_are_verified_against_the_recorded_digests(tmp_path):
    """Every read checks the file (a change during a run is caught where it is read), and a round
    whose digest is recorded is replayed even when its file is gone: refused, never skipped."""
    run = RunDir(tmp_path)
    x = torch.arange(6.0).reshape(3, 2)
    for r in (0, 1):
        run.write_store(r, x + r, torch.zeros(3, dtype=torch.long), pd.DataFrame({"round": [r] * 3, "key": list("abc")}))
    xs, _ = run.read_store_states(run.store_rounds())
    assert [torch.equal(a, x + r) for r, a in enumerate(xs)] == [True, True]
    assert len(run.read_records()) == 6
    (tmp_path / "store" / "round_0000.safetensors").unlink()
    assert run.store_rounds() == [0, 1]
    with pytest.raises(CheckpointError, match=r"round_0000\.safetensors does not match .* it is missing"):
        run.read_store_states(run.store_rounds())
    table = pd.read_parquet(tmp_path / "store" / "round_0001.parquet")
    table.loc[0, "key"] = "z"
    table.to_parquet(tmp_path / "store" / "round_0001.parquet", index=False)
    with pytest.raises(CheckpointError, match=r"round_0001\.parquet does not match the digest recorded at round 1"):
        run.read_records()


def test_store_digests_are_committed_with_each_checkpoint(replay_two_rounds):
    for r in (0, 1):
        d = replay_two_rounds / "checkpoints" / f"round_{r:04d}"
        saved = json.loads((d / "store.json").read_text())["files"]
        assert sorted(saved) == [f"round_{q:04d}.{e}" for q in range(r + 1) for e in ("parquet", "safetensors")]
        for name, digest in saved.items():
            assert hashlib.sha256((replay_two_rounds / "store" / name).read_bytes()).hexdigest() == digest
        assert "store.json" in json.loads((d / "manifest.json").read_text())["files"]


def test_a_changed_store_json_fails_its_checkpoint_like_any_checkpoint_file(tmp_path, replay_two_rounds, capsys):
    run = _copy(replay_two_rounds, tmp_path / "run")
    store_json = run / "checkpoints" / "round_0001" / "store.json"
    store_json.write_text(store_json.read_text().replace('"round_0000.parquet": "', '"round_0000.parquet": "0'))
    capsys.readouterr()
    rd = RunDir(run, resume=True)
    assert rd.load_checkpoint()[0] == 0  # falls back to round 0's checkpoint
    assert "round_0001/store.json does not match its checksum" in _warnings(capsys.readouterr().err)[0]


# ----------------------------------------------------------------------------- no replay: a warning
@pytest.mark.parametrize("damage", ["deleted", "shifted"])
def test_a_damaged_store_file_is_named_in_a_warning_when_nothing_trains_on_it(tmp_path, plain_two_rounds,
                                                                              uninterrupted, capsys, damage):
    run = _copy(plain_two_rounds, tmp_path / "run")
    target = run / "store" / "round_0000.safetensors"
    DAMAGE[damage](target)
    capsys.readouterr()
    run_graft(_problem(), _base(), {}, CFG, run, resume=True, show_progress=False)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and str(target) in warnings[0], warnings
    assert "does not match the digest recorded at round 0 (deleted or changed since" in warnings[0]
    assert "the run goes on" in warnings[0]
    if damage == "deleted":
        shutil.copy(uninterrupted / "store" / "round_0000.safetensors", target)  # for the comparison of the rest
    _assert_same_except(uninterrupted, run, skip={"round_0000.safetensors"})


# ----------------------------------------------------------------------------- older checkpoints
def test_a_checkpoint_without_store_digests_warns_once_and_resumes(tmp_path, replay_two_rounds, capsys):
    run = _copy(replay_two_rounds, tmp_path / "run")
    for d in (run / "checkpoints").glob("round_*"):  # as written before store.json existed
        (d / "store.json").unlink()
        write_manifest(d, ["weights.safetensors", "trainer_state.pt"])
    reference = tmp_path / "reference"
    run_graft(_problem(), _base(), {}, REPLAY, reference, show_progress=False)
    capsys.readouterr()
    run_graft(_problem(), _base(), {}, REPLAY, run, resume=True, show_progress=False)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and "store of rounds <= 1 cannot be verified" in warnings[0], warnings
    _assert_same_except(reference, run)
    # from then on the store is pinned: the new checkpoint records every round's digests
    saved = json.loads((run / "checkpoints" / "round_0002" / "store.json").read_text())["files"]
    assert len(saved) == 6


# ----------------------------------------------------------------------------- latest.json, temp files
@pytest.mark.parametrize("text", ["{{{", '{"round": "x"}', ""])
def test_an_unreadable_latest_json_is_treated_as_missing_with_a_warning(tmp_path, plain_two_rounds, uninterrupted,
                                                                         capsys, text):
    run = _copy(plain_two_rounds, tmp_path / "run")
    (run / "checkpoints" / "latest.json").write_text(text)
    capsys.readouterr()
    run_graft(_problem(), _base(), {}, CFG, run, resume=True, show_progress=False)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and "checkpoints/latest.json cannot be read" in warnings[0], warnings
    assert json.loads((run / "checkpoints" / "latest.json").read_text()) == {"round": 2}
    _assert_same_except(uninterrupted, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "round_0001", "round_0002"]


def test_resume_removes_the_temporary_files_of_killed_writes(tmp_path, plain_two_rounds, uninterrupted):
    run = _copy(plain_two_rounds, tmp_path / "run")
    temps = [run / ".config.json.k3j_9x2a.tmp", run / ".metrics.csv.abcdefgh.tmp",
             run / "checkpoints" / ".latest.json.0a1b2c3d.tmp", run / "store" / ".round_0001.parquet.zzzzzzzz.tmp",
             run / "head" / ".model.safetensors.q1w2e3r4.tmp"]
    for p in temps:
        p.write_text("partial")
    (run / "checkpoints" / ".round_0002.tmp").mkdir()
    (run / "checkpoints" / ".round_0002.tmp" / "weights.safetensors").write_text("partial")
    kept = [run / "notes.tmp", run / ".config.json.tmp", run / ".mine.toolongname.tmp", run / "store" / "README"]
    for p in kept:
        p.write_text("user file")
    run_graft(_problem(), _base(), {}, CFG, run, resume=True, show_progress=False)
    assert not any(p.exists() for p in temps) and not (run / "checkpoints" / ".round_0002.tmp").exists()
    assert all(p.read_text() == "user file" for p in kept)
    _assert_same_except(uninterrupted, run)


# ----------------------------------------------------------------------------- the stop message
def test_the_stop_message_after_round_0_says_round_0_is_saved(tmp_path):
    problem = _problem()
    reward, calls = problem.reward, {"n": 0}

    def stop_in_round_1(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # round 1, sampling chunk 2 of 4
            os.kill(os.getpid(), signal.SIGTERM)
        return reward(*args)

    problem.reward = stop_in_round_1
    with pytest.raises(TrainingInterrupted) as info:
        run_graft(problem, _base(), {}, CFG, tmp_path, show_progress=False)
    assert "during round 1 (sampling); round 0 is saved in" in str(info.value)


# ----------------------------------------------------------------------------- several processes
@pytest.mark.slow
def test_two_processes_resume_a_replay_run_and_refuse_a_damaged_store(tmp_path):
    """torchrun, 2 CPU processes, --replay: the non-main process reads (and checks) the store the
    main process writes, on a fresh run and on a resume; a damaged store is refused by both."""
    base = tmp_path / "base"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pgraft = shutil.which("pgraft")
    subprocess.run([pgraft, "toy", "pretrain", "--out", str(base), "--steps", "20", "--quiet"], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    common = [pgraft, "toy", "train", "--base", str(base), "--rule", "topk", "--top-k", "2", "--group-size", "4",
              "--groups", "8", "--train-steps", "2", "--replay", "--quiet", "--out", str(tmp_path / "run")]
    subprocess.run([*torchrun, *common, "--rounds", "2"], check=True, env=env, timeout=300)
    subprocess.run([*torchrun, *common, "--rounds", "3", "--resume"], check=True, env=env, timeout=300)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "round_0002" / "store.json").read_text())["files"]
    assert len(saved) == 6
    _flip_bit(tmp_path / "run" / "store" / "round_0001.safetensors")
    res = subprocess.run([*torchrun, *common, "--rounds", "4", "--resume"], env=env, timeout=300,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "round_0001.safetensors does not match the digest recorded at round 1" in res.stderr
