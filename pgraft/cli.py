import typer

app = typer.Typer(help="pgraft", no_args_is_help=True)
