"""The ``headrace`` command line: one sub-command per task, each with ``--help``."""

from __future__ import annotations

import typer

from headrace import __version__
from headrace.cli.bench import bench_app
from headrace.cli.capture import capture
from headrace.cli.demo import demo_app
from headrace.cli.init import init
from headrace.cli.run import rebuild, run, status
from headrace.cli.serve import serve, user_app
from headrace.cli.teardown import teardown
from headrace.cli.validate import validate

app = typer.Typer(
    name="headrace",
    help="Real-time analytics on PostgreSQL: every committed change, live, exact.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"headrace {__version__}")
        raise typer.Exit


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Real-time analytics on PostgreSQL: every committed change, live, exact."""


app.command("capture")(capture)
app.add_typer(bench_app, name="bench")
app.add_typer(demo_app, name="demo")
app.command("serve")(serve)
app.add_typer(user_app, name="user")
app.command("run")(run)
app.command("status")(status)
app.command("rebuild")(rebuild)
app.command("teardown")(teardown)
app.command("init")(init)
app.command("validate")(validate)
