"""Refusals a user can act on. The CLI prints their message as one line and exits non-zero
(see :func:`pgraft.core.cli.run_errors`); anything else is unexpected (one line too, and the
traceback with ``PGRAFT_DEBUG=1``)."""

from __future__ import annotations


class RunError(Exception):
    """A run was refused or stopped for a reason the message states (and says how to fix)."""

    exit_code = 1


class UsageError(RunError, ValueError):
    """Bad input: a flag, a file or a directory that cannot be used as given (exit code 2)."""

    exit_code = 2


class RunDirLocked(RunError):
    """Another process is writing the run directory."""


class CheckpointError(RunError):
    """No checkpoint in the run directory passes its checksum / can be read."""


class RunExistsError(RunError, FileExistsError):
    """``--out`` already holds a run and ``--resume`` was not given."""

    exit_code = 2


class FieldError(UsageError):
    """A config field has a bad value; ``field`` names it so a CLI can name its flag instead
    (``flag``: set by the command that knows it, else ``--`` + the field with ``-`` for ``_``)."""

    def __init__(self, field: str, detail: str, message: str | None = None, flag: str | None = None) -> None:
        super().__init__(message or f"{field} {detail}")
        self.field, self.detail, self.flag = field, detail, flag


class RewardError(RunError, ValueError):
    """A reward failed (raised, returned non-finite scores, or its server misbehaved); the message
    names the reward."""
