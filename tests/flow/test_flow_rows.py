"""The protocol's row files (pgraft.apps.flow.resumable.Rows, read through core.state.read_json): a
row round-trips and is reused only while its fingerprint matches; a row file cut short, overwritten
with bytes that are not text, or missing a field is refused in one line that names the file, instead
of a JSONDecodeError / KeyError traceback, and nothing is rewritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgraft.apps.flow.resumable import Rows
from pgraft.core.errors import UsageError
from pgraft.core.state import read_json

ROOT = Path(__file__).resolve().parents[2]


def _row(tmp_path: Path) -> tuple[Rows, Path]:
    rows = Rows(tmp_path)
    rows.put("base-euler-0050", {"n": 12, "seed": 1}, {"inception_fid": 37.317, "n": 12})
    return rows, rows.path("base-euler-0050")


def test_a_row_round_trips_and_is_reused_only_under_its_fingerprint(tmp_path):
    rows, _ = _row(tmp_path)
    assert rows.get("base-euler-0050", {"seed": 1, "n": 12}) == {"inception_fid": 37.317, "n": 12}
    assert rows.get("base-euler-0050", {"n": 12, "seed": 2}) is None
    assert rows.get("other", {"n": 12, "seed": 1}) is None
    assert rows.all() == [{"inception_fid": 37.317, "n": 12}]


@pytest.mark.parametrize("damage, says, says_all", [
    (lambda text: text[: len(text) // 2].encode(), "damaged JSON", None),     # cut short (disk full, a copy stopped)
    (lambda text: b"\xff\xfe" + text.encode(), "not JSON text (byte 0xff at offset 0)", None),
    (lambda text: json.dumps({"fingerprint": {"n": 12, "seed": 1}}).encode(), "no 'row' in its JSON", None),
    (lambda text: b"[1, 2]", "no 'fingerprint', 'row' in its JSON", "no 'row' in its JSON"),  # all() needs the row only
    # still valid JSON, one digit of the result flipped: the row's digest no longer matches
    (lambda text: text.replace("37.317", "37.417").encode(), "does not match its digest", None),
])
def test_a_damaged_row_is_refused_naming_the_file(tmp_path, damage, says, says_all):
    rows, path = _row(tmp_path)
    path.write_bytes(damage(path.read_text()))
    before = path.read_bytes()
    for read, expected in ((lambda: rows.get("base-euler-0050", {"n": 12, "seed": 1}), says),
                           (rows.all, says_all or says)):
        with pytest.raises(UsageError) as err:
            read()
        message = str(err.value)
        assert expected in message
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert message.endswith("delete it and rerun the same command to recompute it")
    assert path.read_bytes() == before


def test_read_json_names_what_breaks_and_the_fix(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"config": {"steps": 50}, "n_train": 60000}')
    assert read_json(path, keys=("config", "n_train"))["config"] == {"steps": 50}
    path.write_text('{"config": {"steps": 50}, "n_tr')
    with pytest.raises(UsageError, match=r"meta\.json: damaged JSON \(Unterminated string .*: line 1, column 27\); "
                                         "rerun stage b"):
        read_json(path, fix="rerun stage b")
    with pytest.raises(UsageError, match=r"meta\.json/nested: cannot read \(Not a directory\)"):
        read_json(tmp_path / "meta.json" / "nested")
    assert UsageError.exit_code == 2


@pytest.mark.slow  # a subprocess importing torch, pandas and the flow app: ~5-10 s on a shared 2-core CPU
def test_the_protocol_script_refuses_a_damaged_row_in_one_line(tmp_path):
    """The script's boundary: a refusal raised inside the protocol (here a cut validation row, read by
    --rescore-runs with --stages report, which computes nothing) is one stderr line and exit status 2."""
    run = tmp_path / "r0"
    (run / "correct").mkdir(parents=True)
    (run / "protocol.json").write_text("{}")
    rows = Rows(run / "validation")
    (rows.dir).mkdir(parents=True)
    bad = rows.dir / "validation-corrected-euler-0008-euler-0008-L000010.json"
    bad.write_text('{"fingerprint": {"n": 12}, "row": {"validation_f')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "flow_protocol.py"), "--tiny", "--select-lengths", "10",
         "--rescore-runs", str(run), "--seed", "1", "--stages", "report", "--results", str(tmp_path / "res")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "damaged JSON" in lines[0], proc.stderr
