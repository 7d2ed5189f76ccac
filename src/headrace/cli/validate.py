"""``headrace validate``: check a pipeline file, and optionally against the source database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from headrace.cli.problems import echo_problem, fail
from headrace.errors import ConfigError, HeadraceError, SourceError
from headrace.pipeline.check_catalog import raise_source_problems
from headrace.pipeline.durations import format_duration
from headrace.pipeline.load import load_pipeline
from headrace.pipeline.model import PipelineConfig
from headrace.source.postgres.connect_errors import connect_sql
from headrace.source.postgres.preflight import server_not_ready


def validate(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The pipeline file to check.")
    ] = Path("headrace.yaml"),
    connect: Annotated[
        bool,
        typer.Option(
            "--connect/--offline",
            help=(
                "Also read the tables' columns and keys from the source database and check "
                "every column the pipeline names (needs the DSN)."
            ),
        ),
    ] = False,
) -> None:
    """Check headrace.yaml: every mistake is reported with its line, field and what is allowed."""
    not_ready = None
    try:
        pipeline = load_pipeline(config)
        if connect:
            not_ready = _check_source(pipeline, str(config))
    except HeadraceError as exc:
        fail(exc)
    typer.echo(summary(pipeline, checked_source=connect))
    if not_ready is not None:
        # The file is right; the server is not ready yet: said, not failed.
        echo_problem("note", f"headrace run would stop here: {not_ready.what}", not_ready.fix)


def _check_source(pipeline: PipelineConfig, file: str) -> SourceError | None:
    """Raise every problem of the pipeline against the source's tables; return what
    would stop a run on the server itself (wal_level, the REPLICATION privilege)."""
    dsn = pipeline.source.resolved_dsn()
    if not dsn:
        raise ConfigError(
            f"no DSN to connect with (source.dsn_env {pipeline.source.dsn_env} is not set)",
            "set the environment variable, or run with --offline",
        )
    try:
        conn = connect_sql(dsn, connect_timeout=10)
    except SourceError as exc:
        raise SourceError(exc.what, f"{exc.fix}; or run with --offline") from exc
    with conn:
        raise_source_problems(conn, pipeline, file)
        return server_not_ready(conn)


def summary(pipeline: PipelineConfig, *, checked_source: bool) -> str:
    """A short description of a valid pipeline."""
    lines = [f"ok: {len(pipeline.source.tables)} table(s), {len(pipeline.rollups)} rollup(s)"]
    for name, table in pipeline.source.tables.items():
        keeps = [k for k in ("mirror", "history") if getattr(table, k)]
        lines.append(f"  table {name}: {', '.join(keeps)}; event time {table.event_time}")
    for rollup in pipeline.rollups:
        grains = ", ".join(format_duration(g) for g in rollup.grains)
        lines.append(
            f"  rollup {rollup.name} on {rollup.table}: grains {grains}; "
            f"{len(rollup.dimensions)} dimension(s), {len(rollup.measures)} measure(s)"
        )
    if not checked_source:
        lines.append("  (columns not checked against the source: use --connect)")
    return "\n".join(lines)
