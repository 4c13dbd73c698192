"""The ``fleetserve`` commands, one module per layer they drive (see cluster/cli.py)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape


def fail(exc: BaseException) -> NoReturn:
    """Every command's error exit: the message as written (no markup, no wrapping inside paths), status 1."""
    Console(stderr=True).print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
    raise typer.Exit(1)
