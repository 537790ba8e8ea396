"""The protocol benchmark's decisions (benchmarks/flow_protocol.py), from fabricated tables: the
corrector preset nearest 0.25x the base, the default corrected rows, and the two verdicts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
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
