"""The protocol benchmark's decisions (benchmarks/flow_protocol.py), from fabricated tables: the
corrector preset nearest 0.25x the base, the default corrected rows, and the two verdicts; and, on the
shipped base at toy sizes, that a headline row's sweep-size row is the row a sweep-size run computes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pgraft.apps.flow.model import from_preset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flow_protocol.py"


def _load():
    spec = importlib.util.spec_from_file_location("flow_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
