"""The ``pgraft`` command: one sub-command group per app."""

from __future__ import annotations

import typer

from pgraft.apps.flow.cli import app as flow_app
from pgraft.apps.layout.cli import app as layout_app
from pgraft.apps.molecule.cli import app as molecule_app
from pgraft.apps.t2i.cli import app as t2i_app
from pgraft.apps.toy.cli import app as toy_app
from pgraft.core.cli import fail, run_errors
from pgraft.core.errors import RunError

app = typer.Typer(help="pgraft: reward fine-tuning of diffusion/flow models by GRAFT, P-GRAFT and inverse "
                       "noise correction.", no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(toy_app, name="toy")
app.add_typer(molecule_app, name="molecule")
app.add_typer(t2i_app, name="t2i")
app.add_typer(flow_app, name="flow")
app.add_typer(layout_app, name="layout")

# every command prints a refusal (bad input, locked or damaged run directory, NaN loss) as one line
for _group in app.registered_groups:
    for _command in _group.typer_instance.registered_commands:
        _command.callback = run_errors(_command.callback)


def main() -> None:
    """Console entry point; a refusal raised outside a command's body is still one line."""
    try:
        app()
    except RunError as err:
        raise SystemExit(fail(str(err), err.exit_code).exit_code) from None


if __name__ == "__main__":
    main()
