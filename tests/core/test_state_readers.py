"""core.state's readers of run files: read_json and read_table refuse a damaged file in one line that
names the file, where it breaks and the mend, and return exactly what was written otherwise."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pgraft.core.errors import UsageError
from pgraft.core.rundir import RunDir
from pgraft.core.state import DIGEST_KEY, RECOMPUTE, atomic_write, read_json, read_table, write_sealed_json


def _table(path):
    table = pd.DataFrame({"method": ["a", "b", "c"], "seed": [0, 1, 2], "value": [0.25, -1.5, 3.0]})
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table


def test_read_table_round_trips_what_was_written(tmp_path):
    table = _table(tmp_path / "t.csv")
    got = read_table(tmp_path / "t.csv", columns=["method"], numeric=["seed", "value"], text=["method"])
    pd.testing.assert_frame_equal(got, table)


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[: b.rindex(b"\n", 0, len(b) - 1) + 4], r"t.csv: row 4 has a missing or non-numeric value in column value"),
    (lambda b: b.replace(b"-1.5", b"-1x5"), r"t.csv: row 3 has a missing or non-numeric value in column value"),
    (lambda b: b.replace(b"\nb,", b"\n,"), r"t.csv: row 3 has a missing or non-numeric value in column method"),
    (lambda b: b.replace(b"seed", b"sed"), r"t.csv: not a seeds table \(no column seed\)"),
    (lambda b: b"", r"t.csv: empty, not a seeds table"),
    (lambda b: b"a,b\n1,2\n3,4,5,6\n", r"t.csv: cannot read as CSV \(Error tokenizing data"),
    (lambda b: b"\xff\xfe\x00junk", r"t.csv: cannot read as CSV \("),
])
def test_read_table_refuses_damage_in_one_line(tmp_path, damage, expected):
    path = tmp_path / "t.csv"
    _table(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UsageError, match=expected) as err:
        read_table(path, numeric=["seed", "value"], text=["method"], what="seeds table")
    assert "\n" not in str(err.value) and str(err.value).endswith(RECOMPUTE)


def test_read_table_names_the_flag_and_a_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"^--merge x.csv: cannot read \(No such file or directory\); mend$"):
        read_table(tmp_path / "x.csv", name="--merge x.csv", fix="mend")


def test_read_json_refuses_damage_in_one_line(tmp_path):
    path = tmp_path / "c.json"
    atomic_write(path, lambda tmp: open(tmp, "w").write('{"a": 1, "b": [2, 3]}'))
    assert read_json(path, keys=("a", "b")) == {"a": 1, "b": [2, 3]}
    with pytest.raises(UsageError, match=r"c.json: no 'c' in its JSON"):
        read_json(path, keys=("a", "c"))
    path.write_bytes(b'{"a": 1, "b": [2,')
    with pytest.raises(UsageError, match=r"c.json: damaged JSON \(Expecting value: line 1, column 18\)"):
        read_json(path)
    path.write_bytes(b'{"a": \xff}')
    with pytest.raises(UsageError, match=r"c.json: not JSON text \(byte 0xff at offset 6\)"):
        read_json(path)


def test_a_damaged_metrics_csv_is_refused_on_resume_not_truncated(tmp_path):
    """RunDir.truncate_after (resume) filters metrics.csv by round: a row whose round was lost to
    damage would be silently dropped; it is refused, and the file left as it was."""
    run = RunDir(tmp_path / "run")
    for r in range(3):
        run.append_metrics({"round": r, "phase": "train", "reward_mean": 0.1 * r})
    good = (run.path / "metrics.csv").read_bytes()
    assert list(run.read_metrics()["round"]) == [0, 1, 2]
    damaged = good.replace(b"\n1,train", b"\n,train")
    (run.path / "metrics.csv").write_bytes(damaged)
    with pytest.raises(UsageError, match=r"metrics.csv: row 3 has a missing or non-numeric value in column round"):
        run.truncate_after(1)
    assert (run.path / "metrics.csv").read_bytes() == damaged


def test_a_sealed_json_round_trips_and_refuses_a_changed_value(tmp_path):
    """write_sealed_json + read_json: what was written comes back (numpy floats as floats, NaN kept,
    the digest removed); any change of content that is still valid JSON is refused; key order and
    whitespace are not content; an unsealed file is read unchecked."""
    path = tmp_path / "row.json"
    value = {"row": {"fid": np.float64(25.588), "nan": float("nan"), "n": 5000}, "fingerprint": {"seed": 1}}
    write_sealed_json(path, value)
    back = read_json(path, keys=("row",))
    assert DIGEST_KEY not in back and back["row"]["fid"] == 25.588 and back["row"]["n"] == 5000
    assert math.isnan(back["row"]["nan"]) and back["fingerprint"] == {"seed": 1}
    sealed = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(sealed.items())))))    # same content, other layout
    assert read_json(path)["row"]["fid"] == 25.588
    for changed in (path.read_text().replace("25.588", "25.589"), path.read_text().replace('"seed": 1', '"seed": 2')):
        path.write_text(changed)
        with pytest.raises(UsageError, match=r"row.json: its content does not match its digest .*; delete it"):
            read_json(path)
    path.write_text(json.dumps({"row": {"fid": 1.0}}))
    assert read_json(path, keys=("row",)) == {"row": {"fid": 1.0}}
    with pytest.raises(ValueError, match="without a '_digest' key"):
        write_sealed_json(path, {DIGEST_KEY: 1})
