"""What every command shares: domain errors become one line on stderr and exit code 1."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import RefineError

console = Console(soft_wrap=True)  # long lines stay whole for grep and logs
err_console = Console(stderr=True, soft_wrap=True)
state = {"debug": False}


@contextmanager
def domain_errors() -> Iterator[None]:
    """Turn a RefineError into `error: ...` on stderr and exit 1; a traceback only with --debug."""
    try:
        yield
    except RefineError as error:
        if state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        raise typer.Exit(code=1) from None
