"""Serving a DuckDB file without ``headrace.position``: tiles still compute, "as of" unknown.

Such a store is a file the pipeline never committed a batch to, or any DuckDB
file a user points ``headrace serve`` at. Tiles whose relations exist compute
normally; tiles whose relations do not exist say which one is missing; the
status endpoints and ``headrace serve`` say the store has no position yet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from headrace.serve.app import ServerThread, create_app
from headrace.serve.settings import AuthSettings
from headrace.serve.store import NO_COMMIT_YET, NO_POSITION_TABLE, ReadOnlyStore
from headrace.serve.tiles import ChartType, Dashboard, Tile, default_dashboards
from headrace.store.duckdb.store import DuckDBStore
from tests.serve.conftest import make_settings

HEADRACE = str(Path(sys.executable).parent / "headrace")

DASHBOARD = Dashboard(
    name="d",
    tiles=[
        # First: the view's first read in its transaction is where a failed read of
        # the position would show.
        Tile(name="rows", chart=ChartType.TABLE, query="SELECT * FROM mirror.t ORDER BY id"),
        Tile(name="missing", query="SELECT * FROM mirror.nowhere"),
        Tile(name="joined", query="SELECT * FROM mirror.t JOIN mirror.gone USING (id)"),
        Tile(name="count", chart=ChartType.STAT, query="SELECT count(*) AS n FROM mirror.t"),
    ],
)


def mirror_only_store(path: Path) -> Path:
    """A DuckDB file with a mirror table and no headrace schema at all."""
    con = duckdb.connect(path)
    try:
        con.execute("CREATE SCHEMA mirror")
        con.execute("CREATE TABLE mirror.t AS SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(id, s)")
    finally:
        con.close()
    return path


class Served:
    """``headrace serve``'s app over a store file opened read-only, on loopback."""

    def __init__(self, path: Path, dashboards: list[Dashboard]) -> None:
        self.store = ReadOnlyStore(path)
        settings = make_settings(
            path, dashboards=dashboards, masked_columns={}, auth=AuthSettings(enabled=False)
        )
        self.server = ServerThread(create_app(settings, self.store), settings).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=30)

    def get(self, path: str) -> Any:
        reply = self.http.get(path)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def tiles(self, dashboard: str) -> tuple[Any, dict[str, dict[str, Any]]]:
        data = self.get(f"/api/dashboards/{dashboard}/data")
        return data, {tile["name"]: tile for tile in data["tiles"]}

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.store.close()


@pytest.fixture
def serve_file() -> Iterator[Any]:
    started: list[Served] = []

    def start(path: Path, dashboards: list[Dashboard]) -> Served:
        served = Served(path, dashboards)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            served.close()


def test_tiles_over_existing_relations_compute_and_missing_ones_are_named(
    tmp_path: Path, serve_file: Any
) -> None:
    served = serve_file(mirror_only_store(tmp_path / "plain.duckdb"), [DASHBOARD])
    assert served.store.position_note == NO_POSITION_TABLE
    data, tiles = served.tiles("d")
    assert data["as_of"] is None
    assert tiles["rows"]["rows"] == [[1, "a"], [2, "b"]]
    assert "error" not in tiles["rows"]
    assert tiles["count"]["rows"] == [[2]]
    assert tiles["missing"]["error"] == "not in the store yet: mirror.nowhere"
    assert tiles["joined"]["error"] == "not in the store yet: mirror.gone"
    # The live stream says the same.
    with served.http.stream("GET", "/api/live/d") as stream:
        event = next(line for line in stream.iter_lines() if line.startswith("data: "))
    live = {tile["name"]: tile for tile in json.loads(event[6:])["tiles"]}
    assert live["rows"]["rows"] == [[1, "a"], [2, "b"]]
    assert live["missing"]["error"] == "not in the store yet: mirror.nowhere"

    health = served.get("/health")
    assert health["status"] == "ok"
    assert health["position"] == {"lsn": None, "as_of": None, "note": NO_POSITION_TABLE}
    assert served.get("/api/tables")["position"]["note"] == NO_POSITION_TABLE


def test_an_empty_duckdb_file_names_what_the_default_dashboard_misses(
    tmp_path: Path, serve_file: Any
) -> None:
    path = tmp_path / "empty.duckdb"
    duckdb.connect(path).close()
    served = serve_file(path, default_dashboards())
    data, tiles = served.tiles("overview")
    assert data["as_of"] is None
    assert tiles["tables"]["error"] == "not in the store yet: headrace.tables"
    assert tiles["alerts"]["error"] == "not in the store yet: headrace.alerts"
    assert served.get("/health")["position"]["note"] == NO_POSITION_TABLE


def test_a_store_whose_first_batch_never_committed(tmp_path: Path, serve_file: Any) -> None:
    path = tmp_path / "store.duckdb"
    DuckDBStore(path).close()  # the layout, and no batch
    served = serve_file(path, default_dashboards())
    assert served.store.position_note == NO_COMMIT_YET
    data, tiles = served.tiles("overview")
    assert data["as_of"] is None
    assert tiles["tables"]["rows"] == []
    assert "error" not in tiles["tables"]
    assert served.get("/health")["position"] == {"lsn": None, "as_of": None, "note": NO_COMMIT_YET}


def test_headrace_serve_says_the_store_has_no_position(tmp_path: Path) -> None:
    path = mirror_only_store(tmp_path / "plain.duckdb")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [HEADRACE, "serve", "--store", str(path), "--no-auth", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            assert health.json()["position"]["note"] == NO_POSITION_TABLE
            break
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    lines = stderr.splitlines()
    assert f"note: {NO_POSITION_TABLE}" in lines, lines
    assert any(line.startswith("serving ") for line in lines), lines
