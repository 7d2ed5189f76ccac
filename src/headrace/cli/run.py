"""``headrace run``, ``headrace status`` and ``headrace rebuild``: the pipeline's commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from headrace.cli.problems import fail
from headrace.errors import ConfigError, HeadraceError

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The pipeline file (headrace.yaml).")
]


def _serve_settings(
    config: Path, store: Path, host: str | None, port: int | None, no_auth: bool
) -> Any:
    """Serving settings: the file's ``serve:`` section when it has one, else the defaults."""
    import yaml  # noqa: PLC0415

    from headrace.serve.settings import (  # noqa: PLC0415
        AuthSettings,
        ServeSettings,
        load_serve_settings,
    )

    overrides: dict[str, Any] = {"store": store, "host": host, "port": port}
    if no_auth:
        overrides["auth"] = AuthSettings(enabled=False)
    document = yaml.safe_load(config.read_text()) or {}
    if isinstance(document, dict) and "serve" in document:
        return load_serve_settings(config, **overrides)
    return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})


def run(
    *,
    config: ConfigOption = Path("headrace.yaml"),
    serve: Annotated[
        bool, typer.Option("--serve", help="Also serve the live store (dashboard, SQL, API).")
    ] = False,
    host: Annotated[
        str | None, typer.Option("--host", help="With --serve: address to listen on.")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="With --serve: TCP port.")] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="With --serve: no login (loopback only).")
    ] = False,
    batch_changes: Annotated[
        int, typer.Option("--batch-changes", min=1, help="Flush a micro-batch at N changes...")
    ] = 50_000,
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", min=0, help="...or after this many ms, whichever first."),
    ] = 30.0,
    queue_batches: Annotated[
        int,
        typer.Option(
            "--queue-batches", min=1, help="Decoded batches waiting for the store at most."
        ),
    ] = 4,
    piece_changes: Annotated[
        int,
        typer.Option(
            "--piece-changes",
            min=1,
            help="Decode and apply a larger transaction this many changes at a time "
            "(still one store transaction): bounds memory for bulk updates.",
        ),
    ] = 100_000,
    heartbeat_s: Annotated[
        float,
        typer.Option("--heartbeat-s", min=0, help="Heartbeat after this many idle seconds."),
    ] = 10.0,
    snapshot_workers: Annotated[
        int, typer.Option("--snapshot-workers", min=1, help="Parallel COPY connections.")
    ] = 2,
    replace_slot: Annotated[
        bool,
        typer.Option(
            "--replace-slot",
            help="First run only: drop an existing slot of that name and snapshot anew.",
        ),
    ] = False,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            help="Record every applied batch (and the store before the first) into this "
            "new directory, for `headrace bench replay`.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
) -> None:
    """Snapshot every table (first run), then stream every change into the store.

    Later runs resume from the position stored with the data. SIGINT/SIGTERM
    finish the current batch, commit it, confirm the slot and exit 0.
    """
    from rich.console import Console  # noqa: PLC0415 - keeps `headrace --help` fast

    from headrace.pipeline.load import load_pipeline  # noqa: PLC0415
    from headrace.run.console import RunDisplay  # noqa: PLC0415
    from headrace.run.runner import Runner  # noqa: PLC0415
    from headrace.run.settings import RunSettings  # noqa: PLC0415
    from headrace.run.signals import StopOnSignals  # noqa: PLC0415

    console = Console(stderr=True)
    live = console.is_terminal
    _configure_logging(verbose, console)
    try:
        pipeline = load_pipeline(config)
        settings = RunSettings(
            batch_max_changes=batch_changes,
            batch_max_wait_s=batch_wait_ms / 1000,
            queue_batches=queue_batches,
            piece_max_changes=piece_changes,
            heartbeat_interval_s=heartbeat_s,
            snapshot_workers=snapshot_workers,
            record_dir=record,
        )
        serve_settings = (
            _serve_settings(config, Path(pipeline.store.path), host, port, no_auth)
            if serve
            else None
        )
        with StopOnSignals() as signals:
            runner = Runner(
                pipeline,
                settings=settings,
                config_path=config,
                display=RunDisplay(console, live=live),
                serve=serve_settings,
                replace_slot=replace_slot,
                stop=signals.stop,
            )
            result = runner.run()
    except HeadraceError as exc:
        fail(exc)
        return
    if result.interrupted_snapshot:
        typer.echo("stopped during the snapshot; the next run starts it over", err=True)


def _configure_logging(verbose: bool, console: Any) -> None:
    from rich.logging import RichHandler  # noqa: PLC0415

    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("headrace").setLevel(logging.DEBUG if verbose else logging.INFO)


def status(
    config: ConfigOption = Path("headrace.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Per table: rows, last applied commit, lag (ms and WAL bytes), batches/s.

    Reads the running pipeline's status file, or the store when nothing runs.
    """
    from rich.console import Console  # noqa: PLC0415

    from headrace.pipeline.load import load_pipeline  # noqa: PLC0415
    from headrace.run.control import RunFiles, active_run, read_json  # noqa: PLC0415
    from headrace.run.status import status_from_store  # noqa: PLC0415
    from headrace.run.status_render import render_status  # noqa: PLC0415
    from headrace.store.duckdb.store import DuckDBStore  # noqa: PLC0415

    try:
        pipeline = load_pipeline(config)
        files = RunFiles(Path(pipeline.store.path))
        document: dict[str, Any] | None = None
        if active_run(files) is not None:
            document = read_json(files.status)
        if document is None:
            if not files.store.exists():
                document = {"running": False, "phase": "empty", "store": str(files.store)}
                document.update({"tables": [], "rollups": []})
            else:
                store = DuckDBStore(files.store, read_only=True)
                try:
                    document = status_from_store(store, pipeline.source.name)
                finally:
                    store.close()
    except HeadraceError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(document, default=str))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # a pipe or a file: no wrapping of table names
        render_status(document, console)


def rebuild(
    rollup: Annotated[str, typer.Argument(help="Name of the rollup to recompute.")],
    config: ConfigOption = Path("headrace.yaml"),
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for a running pipeline.")
    ] = 600.0,
) -> None:
    """Recompute ROLLUP from the mirror (e.g. after its definition changed) and swap it in.

    With a running pipeline the request goes to it and the rebuild happens
    between two batches, while streaming goes on; otherwise it runs here.
    """
    from headrace.pipeline.load import load_pipeline  # noqa: PLC0415
    from headrace.run.control import (  # noqa: PLC0415
        RunFiles,
        RunLock,
        active_run,
        submit_request,
        wait_for_answer,
    )

    try:
        pipeline = load_pipeline(config)
        known = {r.name for r in pipeline.rollups}
        definition = pipeline.rollup(rollup) if rollup in known else None
        if definition is None:
            names = ", ".join(r.name for r in pipeline.rollups) or "(none)"
            raise ConfigError(f"no rollup named {rollup!r} in {config}", f"use one of: {names}")
        files = RunFiles(Path(pipeline.store.path))
        pid = active_run(files)
        if pid is not None:
            request = submit_request(files, "rebuild", rollup)
            typer.echo(f"asked the running pipeline (pid {pid}) to rebuild {rollup} ...", err=True)
            answer = wait_for_answer(files, request, timeout_s)
            if answer is None:
                typer.echo(
                    f"error: no answer within {timeout_s:.0f} s (the request stays queued)",
                    err=True,
                )
                raise typer.Exit(1)
            typer.echo(str(answer.get("message")))
            if not answer.get("ok"):
                raise typer.Exit(1)
            return
        with RunLock(files):
            typer.echo(_rebuild_here(pipeline, rollup, definition))
    except HeadraceError as exc:
        fail(exc)


def _rebuild_here(pipeline: Any, name: str, definition: Any) -> str:
    import time  # noqa: PLC0415

    from headrace.engine.engine import Engine  # noqa: PLC0415
    from headrace.errors import format_lsn  # noqa: PLC0415
    from headrace.store.duckdb.store import DuckDBStore  # noqa: PLC0415

    store = DuckDBStore(pipeline.store.path)
    try:
        engine = Engine(pipeline, store)
        started = time.perf_counter()
        engine.rebuild(name, definition)
        seconds = time.perf_counter() - started
        return f"rebuilt {name} in {seconds:.2f} s at {format_lsn(engine.position() or 0)}"
    finally:
        store.close()
