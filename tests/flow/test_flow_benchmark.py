"""The claims the flow benchmark (benchmarks/flow.py) prints, decided from a fabricated table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "flow.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("flow_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _table(rows):
    return pd.DataFrame([{"config": f"{'corrected' if k else 'base'} {b}/{k}", "steps": b, "noise_steps": k,
                          "flops_per_image": 100 * b + 15 * k, "feature_fid": fid} for b, k, fid in rows])


def test_claims_compare_with_the_inverted_base_and_the_base_with_the_same_steps():
    bench = _load_benchmark()
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
    bench = _load_benchmark()
    table = _table([(10, 0, 20.0), (40, 0, 9.0), (10, 2, 17.0), (10, 30, 8.0)])  # 8.0 only at 1.45x the FLOPs
    c = bench.claims(table, "feature_fid", 10)
    assert not c["lowers_fid_25pct_within_1.35x"]  # -15% within budget
    assert c["reaches_best_base_at_fewer_flops"]   # 1450 < 4000 FLOPs
    assert not bench.claims(table.assign(feature_fid=[20.0, 9.0, 17.0, 9.5]), "feature_fid", 10)[
        "reaches_best_base_at_fewer_flops"]
    assert bench.claims(table.iloc[:2], "feature_fid", 10) == {"metric": "feature_fid", "available": False}


def test_report_pools_evaluate_csvs_of_several_noise_flows(tmp_path, capsys):
    bench = _load_benchmark()

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
