"""Fixtures of the serving tests: a real DuckDB store (docs/store.md), a real server on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from headrace.serve.app import ServerThread, create_app
from headrace.serve.sample import SampleWriter, create_sample_store, sample_dashboard
from headrace.serve.settings import AuthSettings, LiveSettings, ServeSettings, SqlSettings
from headrace.serve.users import Role, UserStore
from headrace.store.duckdb.store import DuckDBStore

PASSWORDS = {"admin": "admin-pass-1", "analyst": "analyst-pass-1", "viewer": "viewer-pass-1"}
MASKS = {
    "viewer": ["*.transactions.card_number", "*.transactions.ip"],
    "analyst": ["*.transactions.card_number"],
}


@dataclass
class Served:
    """A running server over a sample store, with a user and token per role."""

    url: str
    store: DuckDBStore
    writer: SampleWriter
    settings: ServeSettings
    server: ServerThread
    tokens: dict[str, str] = field(default_factory=dict)
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, role: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client authenticated with the role's bearer token (anonymous for None).

        Closed when the test ends.
        """
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        headers.update(kwargs.pop("headers", {}))
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)
        self.clients.append(client)
        return client

    def login(self, role: str) -> tuple[httpx.Client, str]:
        """A client holding a session cookie, and its CSRF token."""
        client = self.client()
        reply = client.post("/api/login", json={"username": role, "password": PASSWORDS[role]})
        assert reply.status_code == 200, reply.text
        return client, str(reply.json()["csrf"])


def make_settings(path: Path, **overrides: Any) -> ServeSettings:
    """Settings for tests: port 0, short SQL timeout, the sample dashboard, masks per role."""
    values: dict[str, Any] = {
        "store": path,
        "port": 0,
        "dashboards": [sample_dashboard()],
        "masked_columns": MASKS,
        "sql": SqlSettings(timeout_s=1.5, row_limit=1000, max_concurrent=2),
        "live": LiveSettings(min_interval_s=0.05, heartbeat_s=1.0, view_grace_s=5.0),
        "auth": AuthSettings(enabled=True),
    }
    values.update(overrides)
    return ServeSettings(**values)


def add_users(settings: ServeSettings) -> dict[str, str]:
    """Create admin, analyst and viewer; returns a bearer token per role."""
    users = UserStore(settings.users_path)
    tokens = {}
    try:
        for name, password in PASSWORDS.items():
            users.add(name, Role.parse(name), password)
            tokens[name] = users.create_token(name, "tests")[1]
    finally:
        users.close()
    return tokens


def open_sample_store(path: Path) -> tuple[DuckDBStore, SampleWriter]:
    """A sample store with one committed batch of 40 transactions and one alert."""
    store = DuckDBStore(path)
    create_sample_store(store)
    writer = SampleWriter(store)
    writer.write(40, alert=True)
    return store, writer


def start_server(store: DuckDBStore, writer: SampleWriter, path: Path, **overrides: Any) -> Served:
    """Create users (when auth is on) and start a server."""
    settings = make_settings(path, **overrides)
    tokens = add_users(settings) if settings.auth.enabled else {}
    server = ServerThread(create_app(settings, store), settings).start()
    return Served(server.url, store, writer, settings, server, tokens)


def stop_server(served: Served) -> None:
    """Close the test's clients, then stop the server."""
    for client in served.clients:
        client.close()
    served.server.stop()


@pytest.fixture
def sample_store(tmp_path: Path) -> Iterator[tuple[DuckDBStore, SampleWriter]]:
    """A fresh sample store for one test."""
    store, writer = open_sample_store(tmp_path / "store.duckdb")
    try:
        yield store, writer
    finally:
        store.close()


@pytest.fixture
def serve(
    tmp_path: Path, sample_store: tuple[DuckDBStore, SampleWriter]
) -> Iterator[Callable[..., Served]]:
    """Start a server over the test's own sample store (settings overridable)."""
    started: list[Served] = []

    def start(**overrides: Any) -> Served:
        served = start_server(*sample_store, tmp_path / "store.duckdb", **overrides)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            stop_server(served)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server per test module (tests sharing it must tolerate each other's writes)."""
    path = tmp_path_factory.mktemp("shared") / "store.duckdb"
    store, writer = open_sample_store(path)
    served = start_server(store, writer, path)
    try:
        yield served
    finally:
        stop_server(served)
        store.close()


@pytest.fixture
def served(shared_server: Served) -> Iterator[Served]:
    """The module's shared server; the test's clients are closed after it."""
    try:
        yield shared_server
    finally:
        for client in shared_server.clients:
            client.close()
        shared_server.clients.clear()
