"""The ``pgraft`` command: one sub-command group per app."""

from __future__ import annotations

import typer

from pgraft.apps.flow.cli import app as flow_app
from pgraft.apps.layout.cli import app as layout_app
from pgraft.apps.molecule.cli import app as molecule_app
from pgraft.apps.t2i.cli import app as t2i_app
from pgraft.apps.toy.cli import app as toy_app

app = typer.Typer(help="pgraft: reward fine-tuning of diffusion/flow models by GRAFT, P-GRAFT and inverse "
                       "noise correction.", no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(toy_app, name="toy")
app.add_typer(molecule_app, name="molecule")
app.add_typer(t2i_app, name="t2i")
app.add_typer(flow_app, name="flow")
app.add_typer(layout_app, name="layout")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
