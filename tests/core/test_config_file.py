"""``--config run.yaml`` (core/config_file.py, ``opts.config_file``): a YAML file and the same
flags give the same resolved config.json; the command line overrides the file; bad files, keys and
values are refused in one line naming the file and the key; every shipped config under configs/
passes its command's validation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from clitools import ok

from pgraft.cli import build, main
from pgraft.core import cli as opts
from pgraft.core.config_file import flatten, read_config_file
from pgraft.core.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
SMALL = {"rounds": 1, "groups": 4, "m": 2, "k": 1, "train_steps": 2, "batch_size": 4, "seed": 3}
SMALL_FLAGS = ["--rounds", "1", "--groups", "4", "--m", "2", "--k", "1", "--train-steps", "2", "--batch-size", "4",
               "--seed", "3"]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def refusal(capsys, *argv: str) -> str:
    """The one stderr line of a ``pgraft`` invocation that must exit 2."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def saved_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_flatten_reads_sections_and_dashes_and_refuses_a_key_given_twice():
    assert flatten({"rounds": 2, "graft": {"train-steps": 5, "rule": "topk"}, "toy": {"mixture": "2d"}}, "f.yaml") == {
        "rounds": 2, "train_steps": 5, "rule": "topk", "mixture": "2d"}
    with pytest.raises(UsageError, match=r"f.yaml: key 'rounds' is given twice"):
        flatten({"rounds": 2, "graft": {"rounds": 3}}, "f.yaml")
    with pytest.raises(UsageError, match=r"key 'train_steps' is given twice"):
        flatten({"train-steps": 2, "train_steps": 3}, "f.yaml")


def test_read_config_file_refuses_non_mappings_and_bad_yaml(tmp_path):
    assert read_config_file(write_yaml(tmp_path / "empty.yaml", "")) == {}
    with pytest.raises(UsageError, match=r"list\.yaml: must be a mapping .* got a list"):
        read_config_file(write_yaml(tmp_path / "list.yaml", "- rounds\n- 2\n"))
    with pytest.raises(UsageError, match=r"text\.yaml: must be a mapping .* got a str"):
        read_config_file(write_yaml(tmp_path / "text.yaml", "rounds 2\n"))
    with pytest.raises(UsageError, match=r"broken\.yaml: not valid YAML at line 2"):
        read_config_file(write_yaml(tmp_path / "broken.yaml", "rounds: 2\n  m: [1\n"))
    # safe_load only: a python tag is refused, never constructed
    with pytest.raises(UsageError, match=r"tag\.yaml: not valid YAML"):
        read_config_file(write_yaml(tmp_path / "tag.yaml", "rounds: !!python/object/apply:os.getcwd []\n"))


def test_yaml_file_and_equivalent_flags_give_identical_config_json(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", "graft:\n" + "".join(f"  {k}: {v}\n" for k, v in SMALL.items())
                        + "  rule: topk\ntoy:\n  reward: ring\n  mixture: 1d\nquiet: true\n")
    ok("toy", "train", "--config", str(config), "--out", str(tmp_path / "file"))
    ok("toy", "train", *SMALL_FLAGS, "--rule", "topk", "--reward", "ring", "--mixture", "1d", "--quiet",
       "--out", str(tmp_path / "flags"))
    from_file, from_flags = saved_config(tmp_path / "file"), saved_config(tmp_path / "flags")
    assert from_file == from_flags
    assert from_file["graft"]["group_size"] == 2 and from_file["graft"]["grs"]["rule"] == "topk"
    assert from_file["app"]["toy"]["reward"] == "ring"
    rows = [pd.read_csv(tmp_path / run / "metrics.csv").drop(columns="seconds") for run in ("file", "flags")]
    pd.testing.assert_frame_equal(*rows)  # the same run (wall-clock seconds aside)


def test_flags_override_the_file(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", "".join(f"{k}: {v}\n" for k, v in SMALL.items())
                        + "rule: topk\nquiet: true\nout: " + str(tmp_path / "from_file") + "\n")
    ok("toy", "train", "--config", str(config), "--rounds", "2", "--seed", "5", "--out", str(tmp_path / "typed"))
    assert not (tmp_path / "from_file").exists()  # --out typed wins over the file's out
    saved = saved_config(tmp_path / "typed")["graft"]
    assert (saved["rounds"], saved["seed"]) == (2, 5)  # typed
    assert (saved["groups"], saved["group_size"], saved["train_steps"]) == (4, 2, 2)  # from the file


def test_unknown_key_is_refused_in_one_line_naming_the_file_and_the_key(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", "rounds: 1\ngraft:\n  roundz: 2\n")
    line = refusal(capsys, "toy", "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert str(config) in line and "unknown key 'roundz'" in line and "train_steps" in line
    assert not (tmp_path / "run").exists()


def test_non_mapping_file_is_refused_in_one_line(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", "- rounds: 1\n")
    line = refusal(capsys, "toy", "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert line.startswith("error: --config ") and str(config) in line and "must be a mapping" in line
    assert "does-not-exist.yaml" in refusal(capsys, "toy", "train", "--config", str(tmp_path / "does-not-exist.yaml"))


def test_bad_values_are_refused_naming_the_file_and_the_key(tmp_path, capsys):
    # the flag's type: refused while parsing
    line = refusal(capsys, "toy", "train", "--config", str(write_yaml(tmp_path / "a.yaml", "rounds: many\n")))
    assert str(tmp_path / "a.yaml") in line and "key 'rounds'" in line
    # the flag's callback (--log-with checks the tracker name)
    line = refusal(capsys, "toy", "train", "--config", str(write_yaml(tmp_path / "b.yaml", "log_with: paper\n")))
    assert str(tmp_path / "b.yaml") in line and "key 'log_with'" in line and "paper" in line
    # the config dataclass (K <= M is GraftConfig's check), in the command's body
    line = refusal(capsys, "toy", "train", "--config", str(write_yaml(tmp_path / "c.yaml", "rule: topk\nk: 5\nm: 2\n")),
                   "--out", str(tmp_path / "run"))
    assert "--k (key 'k' of " + str(tmp_path / "c.yaml") + ")" in line and "K <= M" in line
    # ... but a value typed on the command line is named as the flag alone
    line = refusal(capsys, "toy", "train", "--config", str(tmp_path / "c.yaml"), "--k", "4", "--out",
                   str(tmp_path / "run"))
    assert "Invalid value for --k:" in line and "c.yaml" not in line


# ----------------------------------------------------------------------------- shipped configs
SHIPPED = {  # configs/<app>/<file>: the command that reads it
    "toy": "train", "molecule": "train", "layout": "train", "t2i": "train",
    "flow/pretrain.yaml": "pretrain", "flow/invert.yaml": "invert", "flow/correct.yaml": "correct",
}


def shipped_configs() -> list:
    """(app, command, path) of every shipped config; one that logs to a tracker needs that tracker's
    package (the `trackers` extra), which `--log-with` checks when the file is read."""
    out = []
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        app = path.parent.name
        if app == "accelerate":
            continue
        command = SHIPPED.get(f"{app}/{path.name}") or SHIPPED[app]
        tracker = (read_config_file(path).get("log_with") or "none").lower()
        marks = () if tracker == "none" else pytest.mark.extra(tracker)
        out.append(pytest.param(app, command, path, marks=marks))
    return out


@pytest.mark.parametrize("app,command,path", shipped_configs(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_config_passes_its_commands_validation(app, command, path):
    """Parsed by the command itself (every key known, every value through its type and callback),
    without running it; a train command's GRAFT keys also build a GraftConfig."""
    cmd = typer.main.get_command(build([app])).commands[app].commands[command]
    ctx = cmd.make_context(command, ["--config", str(path)])
    given = read_config_file(path)
    assert given and set(given) <= set(ctx.params)
    for name, value in given.items():
        if name not in ("out", "base_dir", "invert_dir"):
            assert ctx.params[name] == value, name
        assert ctx.get_parameter_source(name).name == "DEFAULT_MAP"
    if command == "train":
        values = {k: ctx.params.get(k, default) for k, (_, default) in opts.GRAFT_FLAGS.items()}
        cfg = opts.graft_config(**values)
        assert cfg.rounds == given["rounds"] and cfg.group_size == given["m"]


def test_configs_ship_for_every_app_and_t2i_family():
    names = {f"{p.parent.name}/{p.name}" for p in (REPO / "configs").glob("*/*.yaml")}
    for app in ("toy", "molecule", "layout"):
        assert any(n.startswith(app + "/") for n in names), app
    for family in ("sd", "sd3"):
        assert {f"t2i/{family}_graft.yaml", f"t2i/{family}_pgraft.yaml"} <= names
    assert "t2i/flux_pgraft.yaml" in names


@pytest.mark.slow
def test_t2i_yaml_file_and_equivalent_flags_give_identical_config_json(tmp_path):
    t2i = {"rounds": 1, "groups": 2, "m": 2, "k": 1, "train_steps": 1, "batch_size": 2, "sample_batch_size": 4,
           "n_steps": 2, "reward": "checker", "t": 0.5, "lora": 2, "quiet": True}
    config = write_yaml(tmp_path / "t2i.yaml", "t2i:\n" + "".join(f"  {k}: {str(v).lower()}\n" for k, v in t2i.items()))
    ok("t2i", "train", "--config", str(config), "--out", str(tmp_path / "file"))
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in t2i.items()]
    ok("t2i", "train", *flags, "--out", str(tmp_path / "flags"))
    from_file = saved_config(tmp_path / "file")
    assert from_file == saved_config(tmp_path / "flags")
    assert from_file["graft"]["split"] == 0.5 and from_file["app"]["t2i"]["reward"] == "checker"
