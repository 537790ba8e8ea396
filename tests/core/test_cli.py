from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pgraft.core import cli as opts
from pgraft.core.errors import RunError, UsageError
from pgraft.core.pretrain import TrainingInterrupted
from pgraft.core.trainer import GraftConfig


def _app(seen: list, **decorator_kwargs) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @opts.graft_options(**decorator_kwargs)
    def train(graft: GraftConfig, out: opts.Out = Path("runs/x"), quiet: opts.Quiet = False) -> None:
        seen.append((graft, out, quiet))

    @app.command()
    def other() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    return app


def test_graft_options_build_the_config_from_flags_with_app_defaults():
    seen: list = []
    app = _app(seen, rule="bon", m=16, t=0.1, sample_batch_size=32)
    result = CliRunner().invoke(app, ["train", "--out", "runs/y", "--top-k", "3", "--lr", "0.01", "--dedup"])
    assert result.exit_code == 0, result.output
    graft, out, quiet = seen[0]
    assert (out, quiet) == (Path("runs/y"), False)
    assert graft.grs.rule == "bon" and graft.grs.k == 3 and graft.group_size == 16 and graft.split == 0.1
    assert graft.lr == 0.01 and graft.dedup and graft.sample_batch_size == 32
    assert graft.rounds == opts.GRAFT_FLAGS["rounds"][1]  # untouched defaults come from the shared table


def test_fixed_flags_are_not_exposed_and_bad_values_are_usage_errors():
    seen: list = []
    app = _app(seen, fixed={"dedup": False})
    assert CliRunner().invoke(app, ["train", "--dedup"]).exit_code == 2  # no such option
    bad = CliRunner().invoke(app, ["train", "--rule", "nope"])
    assert bad.exit_code == 2 and "rule" in bad.output.lower()
    assert CliRunner().invoke(app, ["train"]).exit_code == 0 and not seen[0][0].dedup


def test_graft_options_reject_unknown_or_redeclared_flags():
    with pytest.raises(ValueError, match="unknown GRAFT flags"):
        opts.graft_options(temperature=1.0)
    with pytest.raises(ValueError, match="declares shared GRAFT flags"):
        @opts.graft_options()
        def train(graft: GraftConfig, rounds: int = 3) -> None:
            pass


def _raise(err: BaseException):
    def main():
        raise err
    return main


@pytest.mark.parametrize("main, code, line", [
    (lambda: 3, 3, ""),
    (lambda: object(), 0, ""),                 # a benchmark's main returns its table
    (lambda: True, 0, ""),
    (_raise(UsageError("--out x.csv: row 4 is damaged; restore it")), 2, "error: --out x.csv: row 4 is damaged; restore it"),
    (_raise(RunError("run locked")), 1, "error: run locked"),
    (_raise(TrainingInterrupted(3, Path("r"), signum=15)), 143, "stopped: what was finished is kept; rerun the same "
                                                                "command to go on"),
    (_raise(KeyboardInterrupt()), 130, "stopped: what was finished is kept; rerun the same command to go on"),
])
def test_script_boundary_turns_refusals_and_stops_into_one_line_and_the_shell_code(capsys, main, code, line):
    assert opts.script_boundary(main) == code
    captured = capsys.readouterr()
    assert captured.err.strip() == line and captured.out == ""


def test_script_boundary_lets_an_unexpected_error_through():
    with pytest.raises(ZeroDivisionError):
        opts.script_boundary(lambda: 1 / 0)
