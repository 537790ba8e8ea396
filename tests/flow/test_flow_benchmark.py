"""The flow benchmark (benchmarks/flow.py, stages and claims in pgraft.apps.flow.benchmark): the claims
decided from fabricated tables, the key rows given Inception, the rows resolved from the flags, the
script's stage table, and one-line refusals."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pgraft.apps.flow import benchmark as bench_app
from pgraft.core.errors import UsageError

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "flow.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("flow_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _table(rows):
    return pd.DataFrame([{"config": f"{'corrected' if k else 'base'} {b}/{k}", "steps": b, "noise_steps": k,
                          "flops_per_image": 100 * b + 15 * k, "feature_fid": fid} for b, k, fid in rows])


def test_claims_compare_with_the_inverted_base_and_the_base_with_the_same_steps():
    bench = bench_app
    table = _table([(10, 0, 20.0), (20, 0, 12.0), (40, 0, 9.0),   # base: best 9.0 at 4000 FLOPs
                    (10, 2, 14.0),                                # -30% at 1.03x: within budget
                    (10, 5, 13.0),                                # -35% at 1.075x: best within budget
                    (20, 5, 8.0)])                                # beats the base's best at 2075 < 4000 FLOPs
    c = bench.claims(table, "feature_fid", 10)
    assert c["lowers_fid_25pct_within_1.35x"]
    assert math.isclose(c["best_in_budget"]["relative_change"], -0.35)
    assert c["reaches_best_base_at_fewer_flops"] and c["rows_beating_best_base"] == ["corrected 20/5"]
    by_config = {r["config"]: r for r in c["corrected"]}
    assert math.isclose(by_config["corrected 20/5"]["change_vs_same_base"], 8.0 / 12.0 - 1)
    assert math.isclose(by_config["corrected 10/2"]["change_vs_same_base"], -0.3)


def test_claims_fail_when_correction_does_not_help():
    bench = bench_app
    table = _table([(10, 0, 20.0), (40, 0, 9.0), (10, 2, 17.0), (10, 30, 8.0)])  # 8.0 only at 1.45x the FLOPs
    c = bench.claims(table, "feature_fid", 10)
    assert not c["lowers_fid_25pct_within_1.35x"]  # -15% within budget
    assert c["reaches_best_base_at_fewer_flops"]   # 1450 < 4000 FLOPs
    assert not bench.claims(table.assign(feature_fid=[20.0, 9.0, 17.0, 9.5]), "feature_fid", 10)[
        "reaches_best_base_at_fewer_flops"]
    assert bench.claims(table.iloc[:2], "feature_fid", 10) == {"metric": "feature_fid", "available": False}


def test_report_pools_evaluate_csvs_of_several_noise_flows(tmp_path, capsys):
    bench = bench_app

    def csv(name, rows):
        t = _table(rows).assign(config=lambda d: [("corrected(heun-%d)+euler-%d" % (k, b)) if k else f"base euler-{b}"
                                                  for b, k in zip(d.steps, d.noise_steps)],
                                fid=lambda d: 3 * d.feature_fid, kid=0.0, precision=0.8, recall=0.7, n_samples=1000,
                                n_inception=1000, n_reference=5000, n_reference_inception=1000)
        t.to_csv(tmp_path / f"{name}.csv", index=False)
        return tmp_path / f"{name}.csv"

    a = csv("small", [(10, 0, 20.0), (40, 0, 9.0), (10, 5, 14.0)])     # -30% at 1.075x
    b = csv("medium", [(10, 0, 20.0), (10, 5, 12.0)])                   # same label, another noise flow: -40%
    bench.summarize_csvs([a, b], tmp_path / "out", ["floor=23.1"])
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(table.config) == ["base euler-10", "base euler-40", "small: corrected(heun-5)+euler-10",
                                  "medium: corrected(heun-5)+euler-10"]
    summary = __import__("json").loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["fid"]["best_in_budget"]["config"] == "medium: corrected(heun-5)+euler-10"
    assert math.isclose(summary["fid"]["best_in_budget"]["relative_change"], -0.4)
    assert (tmp_path / "out" / "flow.png").stat().st_size > 0
    assert "lowers fid >= 25% at <= 1.35x FLOPs: YES" in capsys.readouterr().out
    # a CSV whose row lost its step count (a flipped byte) is refused, not pooled without that row
    b.write_text(b.read_text().replace("+euler-10,10,5,", "+euler-10,x0,5,", 1))
    with pytest.raises(UsageError, match=r"medium.csv: row 3 has a missing or non-numeric value in column steps"):
        bench.summarize_csvs([a, b], tmp_path / "out2", [])


def test_inception_goes_to_the_reference_rows_the_best_in_budget_and_the_cheapest_beating_the_best():
    table = _table([(10, 0, 20.0), (20, 0, 12.0), (40, 0, 9.0),
                    (10, 2, 14.0), (10, 5, 13.0),   # 13.0 best within 1.35 x 1000 FLOPs
                    (10, 30, 8.5),                  # beats 9.0 but outside the budget (1450 FLOPs)
                    (20, 5, 8.0)])                  # beats 9.0 too, at 2075 FLOPs: not the cheapest
    table["config"] = [f"base euler-{b}" if k == 0 else f"c{b}/{k}" for b, k in zip(table.steps, table.noise_steps)]
    assert bench_app.inception_rows(table, 10, [10, 20, 40]) == {"base euler-10", "base euler-40", "c10/5", "c10/30"}


def test_rows_from_flags_give_every_corrected_row_its_plain_twin(tmp_path):
    args = bench_app.parser(None, None).parse_args(
        ["--out", str(tmp_path / "run"), "--base-steps", "5,40", "--invert-steps", "8", "--corrected-base-steps",
         "8,13", "--noise-steps", "3,1", "-n", "7"])
    run = bench_app.make_run(args, torch.device("cpu"))
    assert run.base_steps == [5, 8, 13, 40]
    assert run.corrected_base_steps == [8, 13] and run.noise_steps == [3, 1]
    assert (run.n, run.inception, run.base_dir) == (7, True, tmp_path / "run" / "base")
    default = bench_app.make_run(bench_app.parser(None, None).parse_args(["--out", str(tmp_path / "d")]),
                                 torch.device("cpu"))
    assert default.base_steps == [5, 10, 13, 20, 40] and default.corrected_base_steps == [10, 13, 20]
    assert default.noise_steps == [2, 3, 5, 10] and default.train_x is None


def test_script_is_the_stage_table_of_the_app():
    script = _load_script()
    assert [name for name, _ in script.STAGES] == ["base", "invert", "correct", "evaluate", "fit", "grids",
                                                    "summary", "print"]
    assert all(fn is getattr(bench_app, f"stage_{name}") for name, fn in script.STAGES)


@pytest.mark.parametrize("argv, word", [(["--device", "bogus"], "bogus"), (["--base-steps", "2,x"], "2,x"),
                                        (["--report", "/no/such.csv"], "/no/such.csv")])
def test_refusals_are_one_line_naming_the_input(argv, word, capsys):
    with pytest.raises(SystemExit) as err:
        bench_app.main([], argv=argv, prog="flow.py")
    message = str(err.value.code) if err.value.code != 2 else capsys.readouterr().err
    assert word in message and len(message.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_script_refuses_a_damaged_csv_in_one_line(tmp_path):
    """``python benchmarks/flow.py --report CSV``: a damaged evaluate CSV is one ``error:`` line naming
    it and exit code 2, no traceback."""
    import subprocess

    bad = tmp_path / "cut.csv"
    _table([(10, 0, 20.0), (10, 5, 14.0)]).assign(n_samples=1000).to_csv(bad, index=False)
    whole = bad.read_bytes()
    bad.write_bytes(whole[: whole.index(b"corrected 10/5,10,5,") + 20])   # cut before the FLOPs
    done = subprocess.run([sys.executable, "benchmarks/flow.py", "--report", str(bad), "--out", str(tmp_path / "o")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {bad}: row 3 has a missing or non-numeric value in column flops_per_image")
