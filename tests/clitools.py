"""Invoke ``pgraft <app> ...`` in-process for CLI tests; output folded to one line (rich wraps)."""

from __future__ import annotations

from typer.testing import CliRunner

from pgraft.cli import app


def invoke(*args: str):
    """(result, output with all white space folded to single spaces)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    return result, " ".join(result.output.split())


def ok(*args: str) -> str:
    """The folded output of a command that must exit 0."""
    result, output = invoke(*args)
    assert result.exit_code == 0, output + repr(result.exception)
    return output
