"""``headrace teardown``: drop a retired pipeline's replication slot (and publication).

A logical replication slot that nobody reads keeps every WAL segment from its
position on: the source's disk fills up, at the speed of its write traffic.
Stopping ``headrace run`` keeps the slot on purpose (the next run resumes from
it); retiring a pipeline must drop it, and this command is the way to do that
without reaching for psql.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import psycopg
import typer

from headrace.cli.problems import fail
from headrace.errors import ConfigError, HeadraceError, SourceError
from headrace.pipeline.load import load_pipeline
from headrace.source.postgres.connect_errors import connect_sql
from headrace.source.postgres.preflight import slot_state, sql_ident
from headrace.source.postgres.snapshot import drop_slot


def teardown(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The pipeline file naming source and slot.")
    ] = Path("headrace.yaml"),
    publication: Annotated[
        bool,
        typer.Option(
            "--publication/--keep-publication",
            help="Also drop the publication (keep it if other consumers use it).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Drop the pipeline's replication slot on the source (and its publication).

    Run it when a pipeline is retired: a slot nobody reads keeps every WAL
    segment from its position on, until the source's disk is full. A slot in
    use (a running `headrace run`) is refused: stop the run first. The store is
    left as it is, but can no longer resume: a later `headrace run` needs a new
    store file (it snapshots again).
    """
    try:
        pipeline = load_pipeline(config)
        dsn = pipeline.source.resolved_dsn()
        if not dsn:
            raise ConfigError(
                f"no DSN to connect with (source.dsn_env {pipeline.source.dsn_env} is not set)",
                "set the environment variable named by source.dsn_env",
            )
        slot, pub = pipeline.source.slot, pipeline.source.publication
        with connect_sql(dsn, autocommit=True, connect_timeout=10) as conn:
            database = conn.info.dbname
            state = slot_state(conn, slot)
            retained = _retained_wal(conn, slot) if state is not None else None
            has_publication = _publication_exists(conn, pub)
        if state is None:
            typer.echo(f"no replication slot {slot} on database {database}: nothing to drop")
        else:
            typer.echo(f"replication slot {slot} on database {database} retains {retained} of WAL")
            if state.active_pid is not None:
                raise SourceError(
                    f"the slot {slot} is in use by server process {state.active_pid} "
                    "(a running `headrace run`?)",
                    "stop that process first (Ctrl-C or SIGTERM ends headrace run cleanly), "
                    "then run headrace teardown again",
                )
            if not yes:
                typer.confirm(
                    f"drop slot {slot}? the store {pipeline.store.path} will no longer be able "
                    "to resume (a new store would snapshot again)",
                    abort=True,
                )
            drop_slot(dsn, slot, timeout_s=5.0)
            typer.echo(f"dropped replication slot {slot}")
        if publication:
            _drop_publication(dsn, pub, exists=has_publication)
        elif has_publication:
            typer.echo(f"kept publication {pub} (drop it too with --publication)")
    except HeadraceError as exc:
        fail(exc)


def _retained_wal(conn: psycopg.Connection[tuple[object, ...]], slot: str) -> str:
    row = conn.execute(
        "SELECT pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return "an unknown amount" if row is None or row[0] is None else str(row[0])


def _publication_exists(conn: psycopg.Connection[tuple[object, ...]], name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
        is not None
    )


def _drop_publication(dsn: str, name: str, *, exists: bool) -> None:
    if not exists:
        typer.echo(f"no publication {name}: nothing to drop")
        return
    with connect_sql(dsn, autocommit=True, connect_timeout=10) as conn:
        try:
            conn.execute(f"DROP PUBLICATION IF EXISTS {sql_ident(name)}")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SourceError(
                f"cannot drop publication {name}: {str(exc).strip()}",
                f"ask its owner (or a superuser) to run DROP PUBLICATION {sql_ident(name)};",
            ) from exc
    typer.echo(f"dropped publication {name}")
