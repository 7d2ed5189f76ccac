"""``headrace init``: write a starting headrace.yaml from what a PostgreSQL database holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from headrace.cli.problems import echo_problem, fail
from headrace.errors import ConfigError, HeadraceError, SourceError
from headrace.pipeline.discover import discover_tables, dsn_for_file, pipeline_yaml
from headrace.pipeline.load import parse_pipeline
from headrace.source.postgres.connect_errors import connect_sql
from headrace.source.postgres.preflight import server_not_ready


def init(
    dsn: Annotated[
        str,
        typer.Option(
            "--dsn",
            envvar="HEADRACE_DSN",
            help="libpq connection string or URI of the source database (or $HEADRACE_DSN).",
        ),
    ],
    schema: Annotated[
        list[str] | None,
        typer.Option("--schema", help="Follow every table of this schema (repeatable)."),
    ] = None,
    table: Annotated[
        list[str] | None,
        typer.Option(
            "--table", "-t", help="Follow this table, schema.table or table (repeatable)."
        ),
    ] = None,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The file to write; '-' prints it instead."),
    ] = Path("headrace.yaml"),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite the output file if it exists.")
    ] = False,
) -> None:
    """Write a starting headrace.yaml from the tables of a PostgreSQL database.

    Every table with a primary key (or a replica identity index) is followed,
    with an event-time column where one is evident, and one example rollup is
    added. Tables headrace cannot follow as they are appear in the file as
    comments saying why. What would stop `headrace run` on the server
    (wal_level, the REPLICATION privilege) is reported. Edit the file, then
    check it with `headrace validate --connect`.
    """
    if str(output) != "-" and output.exists() and not force:
        fail(
            ConfigError(
                f"{output} already exists",
                "choose another file with --output, or replace it with --force",
            )
        )
    try:
        conn = connect_sql(dsn, connect_timeout=10)
        with conn:
            not_ready = server_not_ready(conn)
            tables = discover_tables(conn, schema or ["public"], table or [])
            origin = f"database {conn.info.dbname} on {conn.info.host}:{conn.info.port}"
    except HeadraceError as exc:
        fail(exc)
    if not tables:
        fail(
            SourceError(
                f"no tables in schema(s) {', '.join(schema or ['public'])}",
                "name the schema with --schema, or the tables with --table",
            )
        )
    file_dsn, had_password = dsn_for_file(dsn)
    text = pipeline_yaml(tables, dsn=file_dsn, dsn_env="HEADRACE_DSN", origin=origin)
    parse_pipeline(text)  # what is written must load (a failure here is a headrace bug)
    if str(output) == "-":
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        followed = sum(1 for t in tables if t.problem is None)
        typer.echo(f"wrote {output}: {followed} of {len(tables)} table(s) followed", err=True)
    for t in tables:
        if t.problem is not None:
            echo_problem("note", f"{t.table} is not followed: {t.problem}", None)
    if had_password:
        typer.echo(
            "note: the DSN's password is not written to the file; the file reads the DSN "
            "from $HEADRACE_DSN (export it before headrace run)",
            err=True,
        )
    if not_ready is not None:
        echo_problem("note", not_ready.what, not_ready.fix)
    target = "headrace.yaml" if str(output) == "-" else str(output)
    typer.echo(
        f"next: headrace validate --config {target} --connect, "
        f"then headrace run --config {target} --serve",
        err=True,
    )
