"""A schema change in the store reaches the tiles at the next version, and never as an error.

The reader keeps each tile query's shape (columns, JSON rendering) per catalog
generation. These tests change the store's schema the way the engine does
(``ALTER TABLE ... ADD COLUMN`` on a mirror, a column widened, a rollup view
re-created with other columns) and read the dashboard over real HTTP at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from headrace.serve.app import ServerThread, create_app
from headrace.serve.catalog import MaskPolicy
from headrace.serve.compute import ViewSpec
from headrace.serve.settings import AuthSettings, ServeSettings
from headrace.serve.tiles import ChartType, Dashboard, Tile, TimeRange
from headrace.store.duckdb.store import DuckDBStore
from tests.conftest import PgDatabase
from tests.run.pipeline import make_pipeline, running, wait_until
from tests.serve.conftest import make_settings

DASHBOARD = Dashboard(
    name="d",
    tiles=[
        Tile(name="rows", chart=ChartType.TABLE, query="SELECT * FROM mirror.t ORDER BY id"),
        Tile(name="volume", chart=ChartType.TABLE, query="SELECT * FROM rollup.v ORDER BY 1"),
        Tile(name="count", chart=ChartType.STAT, query="SELECT count(*) AS n FROM mirror.t"),
    ],
)


class Pipeline:
    """A real store written as the engine writes it, served over HTTP on loopback."""

    def __init__(self, path: Path) -> None:
        self.store = DuckDBStore(path)
        self.lsn = 0
        with self.store.transaction() as con:
            con.execute("CREATE TABLE mirror.t (id INTEGER, amount DECIMAL(10, 2))")
            con.execute("INSERT INTO mirror.t VALUES (1, 2.50), (2, 4.00)")
            con.execute(
                "CREATE VIEW rollup.v AS SELECT id AS bucket, amount AS volume FROM mirror.t"
            )
        self.commit("")
        settings = make_settings(
            path, dashboards=[DASHBOARD], masked_columns={}, auth=AuthSettings(enabled=False)
        )
        self.app = create_app(settings, self.store)
        self.server = ServerThread(self.app, settings).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=30)

    def commit(self, *statements: str, publish: bool = True) -> None:
        """Run ``statements`` and a position update in one transaction, then publish
        the new version (as the engine's writer does after each batch)."""
        self.lsn += 100
        now = datetime.now(UTC)
        with self.store.transaction() as con:
            for statement in statements:
                if statement:
                    con.execute(statement)
            DuckDBStore.write_position(con, "postgres", self.lsn, now)
        if publish:
            self.store.publish(self.lsn, now, ["public.t"], 1)

    def view(self) -> dict[str, dict[str, Any]]:
        """The dashboard's tiles by name, read at the store's current version."""
        reply = self.http.get("/api/dashboards/d/data")
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["version"] == self.store.version
        return {tile["name"]: tile for tile in data["tiles"]}

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.store.close()


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    served = Pipeline(tmp_path / "store.duckdb")
    try:
        yield served
    finally:
        served.close()


def columns(tile: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["name"], c["type"]) for c in tile["columns"]]


def no_errors(tiles: dict[str, dict[str, Any]]) -> None:
    errors = {name: tile["error"] for name, tile in tiles.items() if "error" in tile}
    assert not errors


def test_a_column_added_to_a_mirror_shows_at_the_next_version(pipeline: Pipeline) -> None:
    tiles = pipeline.view()
    no_errors(tiles)
    assert columns(tiles["rows"]) == [("id", "INTEGER"), ("amount", "DECIMAL(10,2)")]
    # At once (well within the catalog's once-a-second reload): the engine adds a
    # column and fills it in the same batch.
    pipeline.commit(
        "ALTER TABLE mirror.t ADD COLUMN note VARCHAR",
        "INSERT INTO mirror.t VALUES (3, 1.25, 'new')",
    )
    tiles = pipeline.view()
    no_errors(tiles)
    assert columns(tiles["rows"]) == [
        ("id", "INTEGER"),
        ("amount", "DECIMAL(10,2)"),
        ("note", "VARCHAR"),
    ]
    assert tiles["rows"]["rows"] == [[1, 2.5, None], [2, 4, None], [3, 1.25, "new"]]
    assert tiles["count"]["rows"] == [[3]]


def test_a_widened_column_and_a_recreated_view_show_at_the_next_version(
    pipeline: Pipeline,
) -> None:
    no_errors(pipeline.view())
    pipeline.commit(
        "ALTER TABLE mirror.t ALTER COLUMN id TYPE BIGINT",
        "CREATE OR REPLACE VIEW rollup.v AS SELECT TIMESTAMPTZ '2026-11-29 10:00:00+00' AS "
        "bucket, id AS tx_count, amount AS volume FROM mirror.t",
    )
    tiles = pipeline.view()
    no_errors(tiles)
    assert columns(tiles["rows"]) == [("id", "BIGINT"), ("amount", "DECIMAL(10,2)")]
    assert columns(tiles["volume"]) == [
        ("bucket", "TIMESTAMP WITH TIME ZONE"),
        ("tx_count", "BIGINT"),
        ("volume", "DECIMAL(10,2)"),
    ]
    assert tiles["volume"]["rows"][0] == ["2026-11-29T10:00:00.000000+00:00", 1, 2.5]


@pytest.mark.parametrize(
    "policy",
    [MaskPolicy(), MaskPolicy(("rollup.v.volume",))],
    ids=["unmasked", "masked"],
)
def test_a_schema_change_the_catalog_has_not_seen_yet_is_retried_not_shown(
    pipeline: Pipeline, policy: MaskPolicy
) -> None:
    """A change committed between the catalog's reload and the view's read makes the
    cached rendering fail: the tile is read again at once, with the columns it has
    now (for a role with masks: masked with the catalog read again, since a masked
    relation's columns are listed). The race is made certain here by not publishing
    the change's version (the reader keeps its catalog while the version stays)."""
    reader = pipeline.app.state.hr.reader
    spec = ViewSpec(DASHBOARD, TimeRange.parse("1h"), (), policy)
    cur = pipeline.store.cursor()
    try:
        first = json.loads(reader.compute_view(cur, spec, 1).payload)
        assert not [t for t in first["tiles"] if "error" in t]
        volume = {t["name"]: t for t in first["tiles"]}["volume"]["rows"]
        assert volume == ([[1, None], [2, None]] if policy.patterns else [[1, 2.5], [2, 4]])
        pipeline.commit(
            "CREATE OR REPLACE VIEW rollup.v AS SELECT id::VARCHAR AS label FROM mirror.t",
            publish=False,
        )
        view = json.loads(reader.compute_view(cur, spec, 2).payload)
    finally:
        cur.close()
    tiles = {tile["name"]: tile for tile in view["tiles"]}
    no_errors(tiles)
    assert columns(tiles["volume"]) == [("label", "VARCHAR")]
    assert tiles["volume"]["rows"] == [["1"], ["2"]]
    assert tiles["rows"]["rows"] == [[1, 2.5], [2, 4]]
    # The next view describes it again (rendered by DuckDB, same answer).
    cur = pipeline.store.cursor()
    try:
        again = json.loads(reader.compute_view(cur, spec, 3).payload)
    finally:
        cur.close()
    assert {t["name"]: t for t in again["tiles"]}["volume"]["rows"] == [["1"], ["2"]]


def test_a_genuine_error_is_still_reported_once_retried(pipeline: Pipeline) -> None:
    pipeline.commit(
        "CREATE OR REPLACE VIEW rollup.v AS SELECT id, CAST(CAST(id AS VARCHAR) AS INTEGER) "
        "AS n FROM mirror.t"
    )
    no_errors(pipeline.view())
    # Same columns; a value the query cannot convert arrives.
    pipeline.commit(
        "CREATE OR REPLACE VIEW rollup.v AS SELECT id, CAST(CASE WHEN id = 2 THEN 'x' "
        "ELSE CAST(id AS VARCHAR) END AS INTEGER) AS n FROM mirror.t"
    )
    tiles = pipeline.view()
    assert "Could not convert string 'x'" in tiles["volume"]["error"]
    assert tiles["rows"]["rows"] == [[1, 2.5], [2, 4]]  # the other tiles still read


def test_a_column_added_in_postgres_reaches_the_served_tile(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    """The whole way: ``ALTER TABLE ... ADD COLUMN`` in PostgreSQL, the engine adds it
    to the mirror, the embedded server's next view shows it."""
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=100)
    latest = Dashboard(
        name="latest",
        tiles=[
            Tile(
                name="latest",
                query="SELECT * EXCLUDE (_hr_lsn) FROM mirror.transactions ORDER BY id DESC "
                "LIMIT 1",
            )
        ],
    )
    serve = ServeSettings(
        store=Path(pipeline.config.store.path),
        port=0,
        dashboards=[latest],
        auth=AuthSettings(enabled=False),
    )
    with running(pipeline, serve=serve) as (runner, _):
        assert runner.server_url is not None
        with httpx.Client(base_url=runner.server_url, timeout=30) as client:

            def view() -> tuple[int, dict[str, Any]]:
                reply = client.get("/api/dashboards/latest/data")
                assert reply.status_code == 200, reply.text
                data = reply.json()
                return int(data["version"]), dict(data["tiles"][0])

            assert "note" not in [c["name"] for c in view()[1]["columns"]]
            pg_db.execute("ALTER TABLE transactions ADD COLUMN note text")
            pg_db.execute(
                "INSERT INTO transactions (id, account_id, amount, status, merchant, "
                "created_at, note) VALUES (100000, 1, 12.34, 'approved', 'm1', now(), 'hello')"
            )
            seen: list[tuple[int, dict[str, Any]]] = []

            def shows_the_row() -> bool:
                seen.append(view())
                rows = seen[-1][1]["rows"]
                return bool(rows) and rows[0][0] == 100000

            wait_until(shows_the_row, 30, "the new row on the dashboard")
            version, shown = seen[-1]
            if "note" not in [c["name"] for c in shown["columns"]]:
                # Only when the batch committed between the catalog's read and the
                # view's read transaction: then the next version must show it.
                wait_until(lambda: view()[0] > version, 10, "the next version")
                version, shown = view()
    assert "error" not in shown, shown["error"]
    assert [c["name"] for c in shown["columns"]][-1] == "note"
    assert shown["rows"][0][0] == 100000
    assert shown["rows"][0][-1] == "hello"
