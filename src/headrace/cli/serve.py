"""``headrace serve`` (a store, read-only, over HTTP) and ``headrace user ...`` (logins)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from headrace.cli.problems import fail
from headrace.errors import HeadraceError

T = TypeVar("T")

user_app = typer.Typer(
    name="user",
    help="Users who may log in to the dashboard, SQL editor and API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

StoreOption = Annotated[
    Path, typer.Option("--store", help="The DuckDB store file (users live beside it).")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="Pipeline config whose 'serve:' section is read."),
]


def _settings(store: Path, config: Path | None, **overrides: Any) -> Any:
    from headrace.serve.settings import ServeSettings, load_serve_settings  # noqa: PLC0415

    if config is not None:
        return load_serve_settings(config, store=store, **overrides)
    return ServeSettings(store=store, **{k: v for k, v in overrides.items() if v is not None})


def serve(
    *,
    store: StoreOption = Path("headrace.duckdb"),
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port.")] = None,
    config: ConfigOption = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No login (allowed on loopback only).")
    ] = False,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample",
            help="Create (or reuse) a sample fintech store at --store and keep writing to it, "
            "to try the dashboard without a pipeline.",
        ),
    ] = False,
) -> None:
    """Serve a store read-only: dashboard, SQL editor, JSON API, /metrics.

    The store must not be open for writing by another process (DuckDB allows one
    writing process); to serve a store while ingesting, use the pipeline's
    embedded server instead.
    """
    import uvicorn  # noqa: PLC0415 - keeps `headrace --help` fast

    from headrace.serve.app import HeadraceServer, create_app  # noqa: PLC0415
    from headrace.serve.settings import AuthSettings  # noqa: PLC0415
    from headrace.serve.store import ReadOnlyStore, ServedStore  # noqa: PLC0415

    try:
        overrides: dict[str, Any] = {"host": host, "port": port}
        if no_auth:
            overrides["auth"] = AuthSettings(enabled=False)
        settings = _settings(store, config, **overrides)
        stop = threading.Event()
        served: ServedStore
        position_note: str | None = None
        if sample:
            served = _sample_store(settings, stop)
        else:
            served = read_only = ReadOnlyStore(
                settings.store,
                memory_limit=settings.sql.memory_limit,
                threads=settings.sql.threads,
                poll_s=settings.live.poll_s,
            )
            position_note = read_only.position_note
        app = create_app(settings, served)
    except HeadraceError as exc:
        fail(exc)
        return
    if settings.auth.enabled and app.state.hr.users.count() == 0:
        typer.echo(
            "note: no users yet, nobody can log in; create one with "
            f"`headrace user add NAME --role admin --store {settings.store}`",
            err=True,
        )
    if position_note:
        typer.echo(f"note: {position_note}", err=True)
    typer.echo(f"serving {settings.store} on http://{settings.host}:{settings.port}/", err=True)
    server = HeadraceServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    )
    try:
        server.run()
    finally:
        stop.set()


def _sample_store(settings: Any, stop: threading.Event) -> Any:
    from headrace.serve.sample import (  # noqa: PLC0415
        SampleWriter,
        create_sample_store,
        sample_dashboard,
    )
    from headrace.store.duckdb.store import DuckDBStore  # noqa: PLC0415

    store = DuckDBStore(settings.store)
    create_sample_store(store)
    if settings.dashboards and settings.dashboards[0].name == "overview":
        settings.dashboards.insert(0, sample_dashboard())
    writer = SampleWriter(store)

    def write() -> None:
        while not stop.wait(1.0):
            writer.write(20, alert=writer.next_id % 400 < 20)

    threading.Thread(target=write, name="headrace-sample-writer", daemon=True).start()
    return store


def _on_users(store: Path, config: Path | None, action: Callable[[Any], T]) -> T:
    """``action`` on the user store, closed afterwards; a HeadraceError ends the command
    with its message (exit 1)."""
    from headrace.serve.users import UserStore  # noqa: PLC0415

    try:
        users = UserStore(_settings(store, config).users_path)
        try:
            return action(users)
        finally:
            users.close()
    except HeadraceError as exc:
        fail(exc)


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[
        str, typer.Option("--role", help="viewer (dashboards), analyst (+SQL), admin (+users).")
    ] = "viewer",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    store: StoreOption = Path("headrace.duckdb"),
    config: ConfigOption = None,
) -> None:
    """Create a user; without --password-stdin a one-time password is generated and printed."""
    from headrace.serve.users import Role  # noqa: PLC0415

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    secret = _on_users(store, config, lambda users: users.add(name, Role.parse(role), password))
    typer.echo(f"created {name} ({Role.parse(role).label})")
    if password is None:
        typer.echo(f"one-time password: {secret}")


@user_app.command("password")
def user_password(
    name: Annotated[str, typer.Argument(help="Login name.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the new password from standard input.")
    ] = False,
    store: StoreOption = Path("headrace.duckdb"),
    config: ConfigOption = None,
) -> None:
    """Set a user's password (a generated one, printed, without --password-stdin) and end
    their sessions: e.g. to replace the one-time password `make demo` printed."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    secret = _on_users(store, config, lambda users: users.set_password(name, password))
    typer.echo(f"new password for {name}; their sessions ended")
    if password is None:
        typer.echo(f"one-time password: {secret}")


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="Login name.")],
    store: StoreOption = Path("headrace.duckdb"),
    config: ConfigOption = None,
) -> None:
    """Delete a user, their API tokens and sessions."""
    if not _on_users(store, config, lambda users: users.remove(name)):
        typer.echo(f"error: no user {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"removed {name}")


@user_app.command("list")
def user_list(
    store: StoreOption = Path("headrace.duckdb"),
    config: ConfigOption = None,
) -> None:
    """List users and their roles."""
    for user in _on_users(store, config, lambda users: users.all()):
        typer.echo(f"{user.name}\t{user.role.label}")


@user_app.command("token")
def user_token(
    name: Annotated[str, typer.Argument(help="Login name.")],
    label: Annotated[str, typer.Option("--label", help="What the token is for.")] = "",
    store: StoreOption = Path("headrace.duckdb"),
    config: ConfigOption = None,
) -> None:
    """Create an API token for a user (printed once; send it as 'Authorization: Bearer ...')."""
    _, secret = _on_users(store, config, lambda users: users.create_token(name, label))
    typer.echo(secret)
