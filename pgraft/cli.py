"""The ``pgraft`` command: one sub-command group per app, and the one error boundary of them all.

Every failure of every command leaves through :func:`main` as one line on stderr,
``error: <message>``, and a non-zero exit:

- a refusal (:class:`~pgraft.core.errors.RunError`: bad input, a locked or damaged run
  directory or base, a non-finite loss) -> its message, exit 2 for usage errors, 1 otherwise;
- a usage error found by the option parser (a bad value, an unknown flag) -> click's message,
  which names the flag, and the command's ``--help``, exit 2;
- a stop by SIGTERM / Ctrl-C -> how to resume (printed by the loop), exit 128 + the signal;
- anything else is unexpected: its message, its type and "rerun with PGRAFT_DEBUG=1 for the
  traceback", exit 1 (with ``PGRAFT_DEBUG=1`` the traceback is printed instead).

Only the app named on the command line is imported (``pgraft toy ...`` never loads diffusers),
so a command starts in about the time torch takes to import.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from pgraft.core.cli import CLICK_ABORTS, CLICK_ERRORS, fail, run_errors, unexpected
from pgraft.core.errors import RunError

HELP = ("pgraft: reward fine-tuning of diffusion/flow models by GRAFT, P-GRAFT and inverse noise correction.")
APPS = {name: f"pgraft.apps.{name}.cli" for name in ("toy", "molecule", "t2i", "flow", "layout")}


def build(names: list[str] | None = None) -> typer.Typer:
    """The ``pgraft`` typer app with the groups of ``names`` (default: every app), each command
    wrapped in :func:`~pgraft.core.cli.run_errors`."""
    root = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False)
    for name in names or list(APPS):
        group = importlib.import_module(APPS[name]).app
        for command in group.registered_commands:
            if not getattr(command.callback, "_pgraft_boundary", False):
                command.callback = run_errors(command.callback)
        root.add_typer(group, name=name)
    return root


def __getattr__(name: str) -> Any:
    """``pgraft.cli.app``: the full app (every group), built on first use (tests, docs)."""
    if name == "app":
        globals()["app"] = build()
        return globals()["app"]
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: builds the app for the group named first, runs it, and prints every
    failure as one line (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    chosen = [args[0]] if args and args[0] in APPS else None
    try:
        root = build(chosen)
        result = root(args=args, prog_name="pgraft", standalone_mode=False)
    except CLICK_ERRORS as err:  # usage errors of the option parser name the flag
        if type(err).__name__ == "NoArgsIsHelpError":  # `pgraft` or `pgraft toy` alone: the help was shown
            raise SystemExit(err.exit_code) from None
        where = f" (see {err.ctx.command_path} --help)" if getattr(err, "ctx", None) is not None else ""
        raise SystemExit(fail(" ".join(err.format_message().split()) + where, err.exit_code).exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C outside a loop that handles it (loading, parsing)
        raise SystemExit(fail("interrupted (Ctrl-C); nothing more was written", 130).exit_code) from None
    except CLICK_ABORTS:
        raise SystemExit(fail("aborted", 130).exit_code) from None
    except RunError as err:  # raised outside a command's body (a callback, building a config)
        raise SystemExit(fail(str(err), err.exit_code).exit_code) from None
    except Exception as err:  # noqa: BLE001 - the boundary: one line, the traceback on request
        raise SystemExit(unexpected(err).exit_code) from None
    # standalone_mode=False returns an explicit exit's code (commands themselves return None)
    raise SystemExit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


if __name__ == "__main__":
    main()
