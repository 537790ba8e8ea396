"""benchmarks/harness.py: resumable cells, paired verdicts, and a compute count that survives a kill."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import harness  # noqa: E402
from harness import Benchmark, Cell, Comparison, Method, Metric  # noqa: E402

from pgraft.core.pretrain import TrainingInterrupted  # noqa: E402
from pgraft.core.trainer import GraftProblem, RoundResult  # noqa: E402

# a method's score at training seed s: its effect + a seed effect both methods share
EFFECT = {"base": 0.0, "a": 1.0, "b": 1.05}
SEED_EFFECT = {0: 10.0, 1: -4.0, 2: 3.0}


def _bench(calls: list) -> Benchmark:
    def run_cell(ctx, method, seed, cell_dir):
        calls.append((method.key, seed))
        return Cell({"score": EFFECT[method.key] + SEED_EFFECT[seed] + 0.001 * seed * (method.key == "b")},
                    sampled=0 if method.kind == "base" else 100)

    methods = {"base": Method("base", "base", "base"), "a": Method("a", "A"), "b": Method("b", "B")}
    return Benchmark(name="fake", methods=methods, metrics={"score": Metric("score")}, run_cell=run_cell,
                     prepare=lambda args: None, comparisons=[Comparison("b", "a", "score"),
                                                             Comparison("a", "base", "score")],
                     reward_metric="score")


def test_cells_are_paired_resumable_and_reported_long(tmp_path, capsys):
    calls: list = []
    argv = ["--out", str(tmp_path), "--seeds", "0,1,2"]
    long = harness.main(_bench(calls), "fake", argv)
    assert sorted(calls) == sorted((m, s) for m in ("base", "a", "b") for s in (0, 1, 2))
    assert set(long.columns) >= {"method", "seed", "metric", "value"}
    assert len(long[long["metric"] == "score"]) == 9
    verdicts = (tmp_path / "verdicts.txt").read_text().splitlines()
    # B − A = 0.05 + 0.001 s: paired, the seed effects (±10) cancel and the difference is separated
    assert verdicts[0].startswith("B − A: score +0.051 [95% CI")
    assert verdicts[0].endswith("→ separated: ahead")
    summary = pd.read_csv(tmp_path / "summary.csv")
    gain = summary[(summary["method"] == "a") & (summary["metric"] == "score_gain_per_1k_sampled")]
    assert gain["mean"].iloc[0] == pytest.approx(1000 * 1.0 / 100)
    # a rerun finds every cell done and trains nothing; a removed cell is the only one rerun
    (tmp_path / "cells" / "a" / "seed_1" / "cell.json").unlink()
    calls.clear()
    harness.main(_bench(calls), "fake", argv)
    assert calls == [("a", 1)]


def test_merge_replaces_only_the_cells_run_here_and_recomputes_gains(tmp_path):
    """--merge: an earlier seeds.csv (all methods) plus fresh cells of one method gives the same report as
    one run of everything; the earlier file's stale rows of that method and its gain rows are dropped."""
    full = harness.main(_bench([]), "fake", ["--out", str(tmp_path / "full"), "--seeds", "0,1,2"])
    earlier = full.copy()
    stale = (earlier["method"] == "b") & (earlier["metric"] == "score")
    earlier.loc[stale, "value"] += 100.0  # the earlier file's b rows are not the ones to keep
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    harness.main(_bench([]), "fake", ["--out", str(tmp_path / "b"), "--seeds", "0,1,2", "--methods", "b"])
    merged = harness.main(_bench([]), "fake", ["--out", str(tmp_path / "b"), "--seeds", "0,1,2", "--methods", "b",
                                               "--report", "--merge", str(tmp_path / "earlier.csv")])
    key = ["method", "seed", "metric"]
    # wall_s differs run to run; every other row, the recomputed gains included, equals the single run's
    drop = lambda t: t[t["metric"] != "wall_s"].sort_values(key).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(drop(merged)[key + ["value"]], drop(full)[key + ["value"]])
    assert (tmp_path / "full" / "verdicts.txt").read_text() == (tmp_path / "b" / "verdicts.txt").read_text()


def test_merge_refuses_a_file_that_is_not_a_seeds_table(tmp_path):
    harness.main(_bench([]), "fake", ["--out", str(tmp_path), "--seeds", "0", "--methods", "b"])
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match=r"--merge .*x.csv: not a seeds.csv \(no column label, seed, eval_seed, value, method, metric\)"):
        harness.main(_bench([]), "fake", ["--out", str(tmp_path), "--report", "--merge", str(tmp_path / "x.csv")])
    full = (tmp_path / "seeds.csv").read_bytes()   # damaged seeds tables: cut inside a row, a flipped digit
    (tmp_path / "cut.csv").write_bytes(full[: full.index(b"\n", full.index(b"\n") + 1) + 8])
    with pytest.raises(SystemExit, match=r"--merge .*cut.csv: row 3 has a missing or non-numeric value in column value"):
        harness.main(_bench([]), "fake", ["--out", str(tmp_path), "--report", "--merge", str(tmp_path / "cut.csv")])
    rows = full.decode().splitlines()
    rows[1] = rows[1][:-1] + "x"
    (tmp_path / "flip.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match=r"--merge .*flip.csv: row 2 has a missing or non-numeric value"):
        harness.main(_bench([]), "fake", ["--out", str(tmp_path), "--report", "--merge", str(tmp_path / "flip.csv")])
    (tmp_path / "junk.csv").write_bytes(b"method\x00\xff\xfe")
    with pytest.raises(SystemExit, match=r"--merge .*junk.csv: "):
        harness.main(_bench([]), "fake", ["--out", str(tmp_path), "--report", "--merge", str(tmp_path / "junk.csv")])


def test_other_settings_are_refused(tmp_path):
    bench = _bench([])
    bench.describe = lambda args: {"budget": 1}
    harness.main(bench, "fake", ["--out", str(tmp_path), "--seeds", "0"])
    bench.describe = lambda args: {"budget": 2}
    with pytest.raises(SystemExit, match="other settings"):
        harness.main(bench, "fake", ["--out", str(tmp_path), "--seeds", "0"])



@pytest.mark.parametrize("name, damage, says", [
    ("cells/a/seed_1/cell.json", lambda t: t[: len(t) // 2], "damaged JSON"),
    ("cells/a/seed_1/cell.json", lambda t: json.dumps({"method": "a"}), "no 'label', 'seed', 'eval_seed'"),
    ("settings.json", lambda t: t[:-3], "damaged JSON"),
    # valid JSON, a result changed: cell.json is sealed with a digest
    ("cells/a/seed_1/cell.json", lambda t: re.sub(r'"score": -?[0-9.]+', '"score": 7.0', t), "does not match its digest"),
])
def test_a_damaged_cell_or_settings_file_is_refused_naming_it(tmp_path, name, damage, says):
    """A cell.json or settings.json cut short or missing fields (disk damage: both are written
    atomically) is one ``error:`` line naming the file; no cell is run or rewritten."""
    bench = _bench([])
    bench.describe = lambda args: {"budget": 1}
    argv = ["--out", str(tmp_path), "--seeds", "0,1"]
    harness.main(bench, "fake", argv)
    path = tmp_path / name
    path.write_text(damage(path.read_text()))
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    calls: list = []
    bench = _bench(calls)
    bench.describe = lambda args: {"budget": 1}
    with pytest.raises(SystemExit) as err:
        harness.main(bench, "fake", argv)
    message = str(err.value.code)
    assert message.startswith(f"error: {path}: ") and says in message and "\n" not in message
    assert calls == [] and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")} == stamps

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


def _round(net, problem, round_, rows=5):
    with torch.no_grad():
        net(torch.zeros(rows, 2))             # sampling: 5 rows
    net(torch.zeros(3, 2)).sum().backward()   # training: 3 rows
    problem.on_round(round_, RoundResult(round_, "train", None, {}))


def test_compute_ledger_counts_committed_rounds_once_across_a_kill(tmp_path):
    net, problem = _Net(), GraftProblem(prior=None, times=torch.tensor([1.0, 0.0]), step=None, loss=None)
    ledger = tmp_path / "compute.json"
    with pytest.raises(KeyboardInterrupt):
        with harness.count_compute(_Net, ledger=ledger) as counter:
            metered = counter.metered(problem)
            _round(net, metered, 0)
            _round(net, metered, 1)
            with torch.no_grad():
                net(torch.zeros(7, 2))        # round 2 is sampled, then the process is killed
            raise KeyboardInterrupt
    assert json.loads(ledger.read_text())["sample_rows"] == 10   # rounds 0 and 1 only
    with harness.count_compute(_Net, ledger=ledger, resume=True) as counter:
        metered = counter.metered(problem)
        _round(net, metered, 2)
    assert counter.complete
    assert (counter.compute.sample_rows, counter.compute.train_rows) == (15, 9)  # as an uninterrupted run
    assert counter.compute.forward_equivalents == 15 + 3 * 9
    with harness.count_compute(_Net, ledger=tmp_path / "none.json", resume=True) as lost:
        pass
    assert not lost.complete   # a resumed cell without a ledger says its count is partial


def test_compute_counts_a_network_called_with_keywords_only():
    """diffusers' transformers are called as transformer(hidden_states=x, timestep=t, ...): their
    rows are counted from the keyword tensors (the positional arguments are empty)."""
    net = _Net()
    with harness.count_compute(_Net) as counter:
        with torch.no_grad():
            net(x=torch.zeros(6, 2))
        net(x=torch.zeros(4, 2)).sum().backward()
        net(torch.zeros(2, 2))
    assert (counter.compute.sample_rows, counter.compute.train_rows) == (6, 6)


@pytest.mark.parametrize("stop, code", [(TrainingInterrupted(None, Path("run"), "stopped", signum=15), 143),
                                        (KeyboardInterrupt(), 130)])
def test_a_stopped_benchmark_says_how_to_go_on_in_one_line(tmp_path, capsys, stop, code):
    """SIGTERM in training (TrainingInterrupted) or Ctrl-C anywhere else: no traceback, the shell's
    exit code for the signal, one line saying the finished cells are kept; the rerun runs only the rest."""
    calls: list = []
    bench = _bench(calls)
    inner = bench.run_cell

    def run_cell(ctx, method, seed, cell_dir):
        if method.key == "b":
            raise stop
        return inner(ctx, method, seed, cell_dir)

    argv = ["--out", str(tmp_path), "--seeds", "0"]
    with pytest.raises(SystemExit) as exit_:
        harness.main(Benchmark(**{**bench.__dict__, "run_cell": run_cell}), "fake", argv)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert err == f"stopped: {harness.INTERRUPTED}\n" and "no --resume" in err
    calls.clear()
    harness.main(_bench(calls), "fake", argv)
    assert calls == [("b", 0)]
