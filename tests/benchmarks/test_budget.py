"""benchmarks/budget.py: method keys, the sweep's methods and comparisons, and the verdicts on
synthetic seeds whose paired differences are known."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import budget  # noqa: E402
from harness import Method, Metric  # noqa: E402

from pgraft.core.errors import UsageError  # noqa: E402

SWEEP = budget.Sweep(t_values=(0.0, 0.25, 0.5), budgets=(3, 30), reward="reward",
                     capacities={"full": {}, "lora1": {"lora_rank": 1}}, quality=("validity",), distance="dist",
                     distance_note="dist: synthetic")
METRICS = {"reward": Metric("reward"), "validity": Metric("validity")}


def to_method(t, capacity):
    return Method(f"m{t}", f"m{t}", "graft", {"rule": "rs", "t": t})


@pytest.mark.parametrize("t,b,cap", [(0.0, 3, ""), (0.25, 100, "lora1"), (0.1, 1000, "full")])
def test_key_round_trip(t, b, cap):
    assert budget.parse_key(budget.method_key(t, b, cap)) == (t, b, cap)


def test_methods_and_comparisons_cover_the_grid():
    methods = budget.sweep_methods(SWEEP, to_method)
    assert len(methods) == 1 + 3 * 2 * 2 and methods["t0.5_s30_lora1"].params["lora_rank"] == 1
    assert methods["t0.25_s3_full"].params == {"rule": "rs", "t": 0.25, "budget": 3, "capacity": "full"}
    comps = budget.sweep_comparisons(SWEEP)
    assert len(comps) == 2 * 2 * 2 and all(c.b.startswith("t0_") for c in comps)
    assert {(c.a, c.b) for c in comps} >= {("t0.5_s3_lora1", "t0_s3_lora1")}


def _frame(gap_small_budget: float) -> pd.DataFrame:
    """Three seeds; at 3 steps t = 0.5 is ``gap_small_budget`` above t = 0 on every seed (plus a
    seed-dependent shift shared by all methods, which the pairing removes); elsewhere t = 0 leads."""
    rows = []
    for cap in SWEEP.capacities:
        for b in SWEEP.budgets:
            for t in SWEEP.t_values:
                for seed in range(3):
                    shared = 0.3 * seed
                    value = 1.0 + shared - t + 0.01 * seed * t
                    if b == 3 and t == 0.5:
                        value = 1.0 + shared + gap_small_budget + 0.01 * seed
                    key = budget.method_key(t, b, cap)
                    rows += [{"method": key, "label": key, "seed": seed, "eval_seed": 1000 + seed,
                              "metric": "reward", "value": value},
                             {"method": key, "label": key, "seed": seed, "eval_seed": 1000 + seed,
                              "metric": "validity", "value": 0.9}]
    return budget.long_frame(pd.DataFrame(rows))


def test_long_frame_columns():
    frame = _frame(0.2)
    assert list(frame.columns[:5]) == ["method", "t", "budget", "capacity", "seed"]
    row = frame[frame["method"] == "t0.25_s30_lora1"].iloc[0]
    assert (row["t"], row["budget"], row["capacity"]) == (0.25, 30, "lora1")


def test_verdicts_find_the_separated_win_and_the_best_t():
    found = budget.verdicts(_frame(0.2), SWEEP, METRICS, "synthetic")
    text = "\n".join(found.lines)
    assert found.wins == ["t=0.5 at 3 steps (full)", "t=0.5 at 3 steps (lora1)"]
    assert text.splitlines()[0].startswith("synthetic: is there a budget (or capacity) where some t > 0 beats "
                                           "t = 0 on reward, separated? yes")
    assert "best t at 3 steps (full): t=0.5" in text and "best t at 30 steps (full): t=0 " in text
    assert "family-wise (Holm over the 8 tested comparisons" in text
    assert "validity 0.900 [0.900, 0.900]" in text


def test_verdicts_say_no_when_graft_leads_everywhere():
    found = budget.verdicts(_frame(-0.2), SWEEP, METRICS, "synthetic")
    assert found.wins == [] and "? no: no t > 0 beats t = 0" in found.lines[0]


def _probe(gains: dict[float, float], steps: int) -> pd.DataFrame:
    return pd.DataFrame([{"t": t, "train_steps": steps, "progress": 1.0, "kept": 1.0, "predicted_gain": g}
                         for t, g in gains.items()])


def test_validation_compares_recommended_with_best_measured():
    """At 3 steps t = 0.5 is best measured (+0.2 on every seed); a probe recommending it agrees, one
    recommending t = 0 does not (its paired difference to the best is separated); at 30 steps t = 0 is best."""
    frame = _frame(0.2)
    good = {3: _probe({0.0: 1.0, 0.25: 1.1, 0.5: 1.2}, 3), 30: _probe({0.0: 1.0, 0.5: 0.5}, 30)}
    lines = budget.validation_lines(frame, good, SWEEP, "full", METRICS, "synthetic")
    assert "2 of 2 budgets agree" in lines[0]
    assert "3 steps: recommended t = 0.5" in lines[2] and "best measured t = 0.5" in lines[2]
    bad = {3: _probe({0.0: 1.0, 0.5: 0.5}, 3)}
    lines = budget.validation_lines(frame, bad, SWEEP, "full", METRICS, "synthetic")
    assert "0 of 1 budgets agree" in lines[0] and "→ separated" in lines[2]


def test_probe_validation_reads_its_tables_and_refuses_damaged_ones(tmp_path):
    """budget.py APP --probes: the recommended t of each s<N>/probe.csv against the committed sweep;
    a damaged probe table or sweep table is one line naming it (nothing written)."""
    results = tmp_path / "results"
    results.mkdir()
    sweep_csv = Path(__file__).resolve().parents[2] / "docs" / "results" / "toy_budget.csv"
    (results / "toy_budget.csv").write_bytes(sweep_csv.read_bytes())
    (tmp_path / "p" / "s3").mkdir(parents=True)
    probe = tmp_path / "p" / "s3" / "probe.csv"
    pd.DataFrame({"t": [0.0, 0.25, 0.5, 0.75], "train_steps": 3,
                  "predicted_gain": [0.99, 0.95, 0.90, 0.79]}).to_csv(probe, index=False)
    argv = ["toy", "--probes", str(tmp_path / "p"), "--results", str(results)]
    budget.validate_main(argv)
    text = (results / "toy_budget_validation.txt").read_text()
    assert "\n3 steps: recommended t = 0 (predicted one-round gains t=0: 0.99," in text
    (results / "toy_budget_validation.txt").unlink()
    probe.write_text(probe.read_text().replace("0.25,3,", "0.25,x,", 1))
    with pytest.raises(UsageError, match=r"s3/probe.csv: row 3 has a missing or non-numeric value in column train_steps"):
        budget.validate_main(argv)
    pd.DataFrame({"t": [0.0], "train_steps": [3], "predicted_gain": [0.9]}).to_csv(probe, index=False)
    whole = (results / "toy_budget.csv").read_bytes()
    (results / "toy_budget.csv").write_bytes(whole[: whole.index(b"\n", 200) + 5])
    with pytest.raises(UsageError, match=r"toy_budget.csv: row \d+ has a missing or non-numeric value"):
        budget.validate_main(argv)
    assert not (results / "toy_budget_validation.txt").exists()
