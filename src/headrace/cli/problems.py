"""How the CLI tells a user about a problem: what happened, then what to do."""

from __future__ import annotations

from typing import NoReturn

import typer

from headrace.errors import HeadraceError


def echo_problem(label: str, what: str, fix: str | None) -> None:
    """``label: what`` and, when there is one, ``  what to do: fix``, on stderr."""
    typer.echo(f"{label}: {what}", err=True)
    if fix:
        typer.echo(f"  what to do: {fix}", err=True)


def fail(exc: HeadraceError) -> NoReturn:
    """Print ``exc`` as an error and exit 1 (no traceback)."""
    echo_problem("error", exc.what, exc.fix)
    raise typer.Exit(1) from None
