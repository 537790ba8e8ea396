"""Invoke ``pgraft <app> ...`` in-process for CLI tests; output folded to one line (rich wraps)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

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


@contextlib.contextmanager
def lock_held_by_another_process(directory) -> Iterator[int]:
    """A child process that holds the writer lock of ``directory`` (core.integrity.exclusive) for
    the block; yields its PID. The child is killed at the end, leaving a stale lock file behind."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


_HOLDER = """
import sys
from pgraft.core.integrity import exclusive
with exclusive(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # holds the lock until killed (a fixed sleep ran out on a loaded machine)
"""
