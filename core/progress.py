"""Rich progress bars that degrade to nothing on non-main processes or when disabled, and the
console every command prints its tables with."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_console(stderr: bool = False) -> Console:
    """A rich console that does not truncate tables in logs: 160 columns when stdout (stderr) is
    not a terminal (rich would fall back to 80 there), the terminal's width otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(width=None if stream.isatty() else 160, stderr=stderr)


def warn(message: str) -> None:
    """Print ``warning: message`` as one line on stderr (never a ``warnings.warn`` source line):
    something was recovered from or cannot be checked, and the run goes on."""
    make_console(stderr=True).print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True,
                                    markup=True)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows a rich bar with ETA when ``enabled``.

    Extra keyword fields (e.g. ``loss=0.12``) are shown after the bar.
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance
