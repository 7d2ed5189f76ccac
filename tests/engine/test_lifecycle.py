"""Snapshot then stream, rebuild while data keeps coming, retention, commit-time buckets,
and the all-or-nothing batch transaction."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from headrace.errors import StoreError
from headrace.pipeline.load import parse_pipeline
from headrace.pipeline.model import RollupConfig
from headrace.source.changes import ChangeBatch, Column, SnapshotChunk, TableRef, TableSchema
from headrace.store.base import CommitEvent
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness, recorded_source

YAML = """
source:
  dsn: "DSN"
  tables:
    acct: {}
    tx: {event_time: ts, history: true}
rollups:
  - name: vol
    table: tx
    grain: 5m
    coarser: [1h, 1d]
    dimensions:
      - status
      - name: tier
        lookup: {table: acct, on: acct_id, column: tier}
    measures:
      - {name: n, fn: count}
      - {name: volume, fn: sum, column: amount}
      - {name: hi, fn: max, column: amount}
      - {name: accounts, fn: count_distinct, column: acct_id}
"""

SCHEMA = """
CREATE TABLE acct (id int PRIMARY KEY, tier text);
CREATE TABLE tx (id bigint PRIMARY KEY, acct_id int, amount numeric(12,2), status text,
                 ts timestamptz);
INSERT INTO acct SELECT i, (ARRAY['gold','silver','bronze'])[1 + i % 3]
  FROM generate_series(1, 100) i;
INSERT INTO tx SELECT i, 1 + i % 100, (i % 1000) / 10.0, (ARRAY['ok','declined'])[1 + i % 2],
  '2024-01-01'::timestamptz + (i % 5000) * interval '1 minute'
  FROM generate_series(1, 50000) i;
"""

TIERS = "(SELECT tx.*, acct.tier AS current_tier FROM tx LEFT JOIN acct ON acct.id = tx.acct_id) s"


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute(SCHEMA)
    harness = make_harness(pg_db, tmp_path, YAML, snapshot=False)
    yield harness
    harness.close()


def test_snapshot_then_stream(h: Harness) -> None:
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")
    events: list[CommitEvent] = []
    h.store.subscribe(events.append)
    loaded = h.snapshot(chunk_rows=7000)
    assert loaded.rows == {"public.tx": 50000, "public.acct": 100}
    assert loaded.rows_per_second > 0
    assert h.engine.position() == loaded.position
    assert events[-1].kind == "snapshot"
    h.assert_mirror("tx", ["id", "acct_id", "amount", "status", "ts"])
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    assert h.duck("SELECT rows FROM headrace.tables ORDER BY table_name") == [(100,), (50000,)]
    # Snapshot rows are in the history, marked S.
    assert h.duck("SELECT count(*) FROM history.tx WHERE _hr_op = 'S'") == [(50000,)]
    # Then the stream: no gap, no duplicate.
    h.execute(
        "UPDATE tx SET amount = amount + 1 WHERE id % 7 = 0",
        "DELETE FROM tx WHERE id % 11 = 0",
        "INSERT INTO tx SELECT i, 1, 5, 'ok', '2024-01-02' FROM generate_series(50001, 50100) i",
    )
    h.sync()
    h.assert_mirror("tx", ["id", "acct_id", "amount", "status", "ts"])
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    assert events[-1].kind == "batch"
    assert events[-1].tables == ("public.tx",)
    assert [e.version for e in events] == list(range(events[0].version, events[-1].version + 1))


def test_interrupted_snapshot_leaves_nothing(h: Harness) -> None:
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")

    def failing() -> Iterator[SnapshotChunk]:
        table = TableSchema(
            TableRef("public", "acct"),
            1,
            (
                Column("id", 23, -1, "int4", pa.int32(), is_key=True),
                Column("tier", 25, -1, "text", pa.string()),
            ),
        )
        yield SnapshotChunk(table, pa.table({"id": [1, 2], "tier": ["a", "b"]}), 100)
        raise RuntimeError("copy connection lost")

    with pytest.raises(RuntimeError):
        h.engine.load_snapshot(failing())
    assert h.engine.position() is None
    assert h.duck("SELECT count(*) FROM headrace.position") == [(0,)]
    assert h.duck("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'mirror'") == [(0,)]
    h.snapshot()  # a fresh snapshot works afterwards
    assert h.duck("SELECT count(*) FROM mirror.acct") == [(100,)]


def with_minimum(h: Harness) -> RollupConfig:
    """Rollup ``vol`` with one more measure (a minimum): a definition to rebuild to."""
    return parse_pipeline(
        YAML.replace(
            "{name: n, fn: count}",
            "{name: n, fn: count}\n      - {name: lo, fn: min, column: amount}",
        ).replace("DSN", h.db.dsn)
    ).rollup("vol")


def test_rebuild_while_data_keeps_coming(h: Harness) -> None:
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")
    h.snapshot()
    stop = threading.Event()
    lookup = "(SELECT tier FROM acct WHERE acct.id = tx.acct_id)"
    recorded = {
        int(r[0]): None if r[1] is None else str(r[1])  # type: ignore[call-overload]
        for r in h.pg(f"SELECT id, {lookup} FROM tx")
    }

    def writer() -> None:
        with h.db.connect() as conn:
            for i in range(1, 150):
                if stop.is_set():
                    return
                for statement in (
                    f"UPDATE tx SET amount = amount + 1, status = 'declined' "
                    f"WHERE id % 4999 = {i % 4999} RETURNING id, {lookup}",
                    f"INSERT INTO tx VALUES ({100000 + i}, {i % 100}, {i}, 'ok', now()) "
                    f"RETURNING id, {lookup}",
                ):
                    for row in conn.execute(statement.encode()).fetchall():
                        recorded[int(row[0])] = None if row[1] is None else str(row[1])  # type: ignore[call-overload]
                conn.execute(
                    f"UPDATE acct SET tier = 'platinum{i % 3}' WHERE id = {i % 100}".encode()
                )
                time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    rebuilt: list[CommitEvent] = []
    h.store.subscribe(lambda e: rebuilt.append(e) if e.kind == "rebuild" else None)
    changed = with_minimum(h)
    try:
        commits = itertools.count()
        round_ = 0
        while thread.is_alive() or round_ < 6:
            round_ += 1
            h.sync(lambda: next(commits) % 25 == 0)
            if round_ == 2:
                h.engine.request_rebuild("vol")  # same definition, e.g. after a repair
            if round_ == 4:
                h.engine.request_rebuild("vol", changed)  # a new measure
                h.config = h.config.model_copy(update={"rollups": [changed]})
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    h.sync()
    assert h.engine.finish_rebuilds(60)
    assert len(rebuilt) == 2
    assert "lo" in [
        c for (c,) in h.duck("SELECT column_name FROM duckdb_columns() WHERE table_name = 'vol_5m'")
    ]
    h.assert_rollup("vol", recorded_source(recorded), {"tier": "recorded_tier"})
    h.assert_mirror("tx", ["id", "acct_id", "amount", "status", "ts"])


def test_rebuild_catches_up_groups_changed_while_it_computed(h: Harness) -> None:
    """Batches applied while a rebuild computes (held by the test's gate) change
    groups under the new definition: moved between buckets and statuses, deleted,
    inserted, and a maximum retracted. After the swap the rebuilt rollup equals
    PostgreSQL; meanwhile the old definition was still maintained and served."""
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")
    h.snapshot()
    gate = threading.Event()
    h.engine.rebuild_gate = gate
    changed = with_minimum(h)
    answers: list[tuple[bool, str]] = []
    h.engine.request_rebuild("vol", changed, lambda ok, message: answers.append((ok, message)))
    h.execute(
        "UPDATE tx SET ts = ts + interval '7 minutes', status = 'declined' WHERE id % 97 = 0",
        "DELETE FROM tx WHERE id % 89 = 0",
        "UPDATE tx SET amount = amount + 0.5 WHERE amount = (SELECT max(amount) FROM tx)",
        "INSERT INTO tx SELECT 60000 + i, 1 + i % 100, i, 'ok', "
        "'2024-01-02'::timestamptz + i * interval '1 minute' FROM generate_series(1, 300) i",
    )
    h.sync()
    assert h.engine.rebuilding
    assert answers == []
    # The old definition is maintained meanwhile: its view has no "lo" and is exact.
    columns = "SELECT column_name FROM duckdb_columns() WHERE table_name = 'vol_5m'"
    assert "lo" not in [c for (c,) in h.duck(columns)]
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    h.execute("UPDATE tx SET status = 'ok' WHERE id % 101 = 0", "DELETE FROM tx WHERE id < 40")
    h.sync()
    gate.set()
    assert h.engine.finish_rebuilds(60)
    assert [ok for ok, _ in answers] == [True]
    assert "lo" in [c for (c,) in h.duck(columns)]
    h.config = h.config.model_copy(update={"rollups": [changed]})
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    h.assert_reserves("vol")  # the groups changed meanwhile were recomputed with the state
    # Streaming goes on with the new definition.
    h.execute("UPDATE tx SET amount = amount * 2 WHERE id % 53 = 0")
    h.sync()
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    h.assert_reserves("vol")


def test_rebuild_starts_over_after_a_schema_change(h: Harness) -> None:
    """A column added while a rebuild computes: the rebuild's snapshot would not show
    it, so it starts over after that batch and still ends exact."""
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")
    h.snapshot()
    gate = threading.Event()
    h.engine.rebuild_gate = gate
    answers: list[bool] = []
    h.engine.request_rebuild("vol", None, lambda ok, _: answers.append(ok))
    h.execute("UPDATE tx SET status = 'declined' WHERE id % 7 = 0")
    h.sync()
    h.execute("ALTER TABLE tx ADD COLUMN note text", "UPDATE tx SET note = 'x' WHERE id % 5 = 0")
    h.sync()
    assert h.engine.rebuilding
    assert answers == []
    gate.set()
    assert h.engine.finish_rebuilds(60)
    assert answers == [True]
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    h.assert_mirror("tx", ["id", "amount", "status", "note"])


RETENTION_YAML = """
source:
  dsn: "DSN"
  tables:
    ev: {event_time: ts, history: true, retention: 30d}
rollups:
  - name: daily
    table: ev
    grain: 1h
    coarser: [1d]
    retention: 2d
    measures:
      - {name: n, fn: count}
      - {name: hi, fn: max, column: v}
"""


def test_retention(pg_db: PgDatabase, tmp_path: Path) -> None:
    now = datetime(2024, 6, 10, 12, 0, tzinfo=UTC)
    pg_db.execute(
        "CREATE TABLE ev (id int PRIMARY KEY, v int, ts timestamptz);"
        "INSERT INTO ev VALUES (1, 1, '2024-06-01 00:30+00'), (2, 2, '2024-06-09 10:00+00'),"
        " (3, 3, '2024-06-10 11:00+00');"
    )
    h = make_harness(pg_db, tmp_path, RETENTION_YAML)
    try:
        assert h.duck("SELECT count(*) FROM rollup.daily_1d") == [(3,)]
        applied = h.engine.enforce_retention(now)
        horizon = datetime(2024, 6, 8, tzinfo=UTC)  # now - 2d, floored to the coarsest grain
        assert h.duck("SELECT retained_from FROM headrace.rollups") == [(horizon,)]
        assert applied.rollup_groups == {"daily": 1}
        # Changes to rows of dropped buckets are ignored; recent ones count.
        h.execute(
            "UPDATE ev SET v = 10 WHERE id = 1",
            "DELETE FROM ev WHERE id = 1",
            "INSERT INTO ev VALUES (4, 4, '2024-06-10 11:30+00'), (5, 5, '2024-05-01 00:00+00')",
            "UPDATE ev SET v = 1 WHERE id = 3",
        )
        h.sync()
        h.assert_rollup("daily", "(SELECT * FROM ev WHERE ts >= '2024-06-08+00') e")
        h.assert_reserves("daily")  # the dropped buckets' values went with them
        h.engine.compact_rollups(force=True)
        assert h.duck("SELECT min(_hr_rows) FROM rollup.daily__state") == [(1,)]
        # History: rows whose commit is older than 30 days go.
        before = h.duck("SELECT count(*) FROM history.ev")[0][0]
        gone = h.engine.enforce_retention(datetime.now(UTC) + timedelta(days=31))
        assert gone.history_rows == {"public.ev": before}
        # The horizon never moves back.
        h.engine.enforce_retention(now - timedelta(days=10))
        kept_from = h.duck("SELECT retained_from FROM headrace.rollups")[0][0]
        assert isinstance(kept_from, datetime)
        assert kept_from > horizon
    finally:
        h.close()


COMMIT_YAML = """
source:
  dsn: "DSN"
  tables:
    ev: {history: true}
rollups:
  - name: per_minute
    table: ev
    grain: 1m
    dimensions: [kind]
    measures:
      - {name: n, fn: count}
"""


def test_commit_time_buckets(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute("CREATE TABLE ev (id int PRIMARY KEY, kind text); INSERT INTO ev VALUES (1, 'a')")
    h = make_harness(pg_db, tmp_path, COMMIT_YAML)
    try:
        snapshot_bucket = h.duck("SELECT bucket FROM rollup.per_minute_1m")[0][0]
        assert isinstance(snapshot_bucket, datetime)
        assert abs(snapshot_bucket - datetime.now(UTC)) < timedelta(minutes=2)
        h.execute("INSERT INTO ev VALUES (2, 'b')")
        h.sync()
        inserted = h.duck("SELECT _hr_commit_ts FROM history.ev WHERE id = 2 AND _hr_op = 'I'")[0][
            0
        ]
        assert isinstance(inserted, datetime)
        bucket = inserted.replace(second=0, microsecond=0)
        assert h.duck("SELECT bucket FROM rollup.per_minute_1m WHERE kind = 'b'") == [(bucket,)]
        time.sleep(1.1)
        # An update (even a key move) keeps the insert's commit time.
        h.execute("UPDATE ev SET kind = 'c' WHERE id = 2", "UPDATE ev SET id = 3 WHERE id = 2")
        h.sync()
        assert h.duck("SELECT bucket, n FROM rollup.per_minute_1m WHERE kind = 'c'") == [
            (bucket, 1)
        ]
        assert h.duck("SELECT _hr_event_ts FROM mirror.ev WHERE id = 3") == [(inserted,)]
    finally:
        h.close()


def test_a_failed_batch_leaves_nothing(h: Harness) -> None:
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")
    h.snapshot()
    position = h.engine.position()
    h.execute("DELETE FROM tx WHERE id < 100", "UPDATE acct SET tier = 'x'")
    batch = h.batches()[0]
    # Break the rollup's state table behind the engine's back: the batch fails late,
    # after its mirror writes.
    h.store.writer.execute("DROP TABLE rollup.vol__state")
    with pytest.raises(StoreError):
        h.engine.apply(batch)
    assert h.engine.position() == position
    assert h.duck("SELECT count(*) FROM mirror.tx WHERE id < 100") == [(99,)]
    assert h.duck("SELECT lsn FROM headrace.position") == [(position,)]


def test_heartbeat_and_replayed_batches(h: Harness) -> None:
    h.db.execute("SELECT pg_drop_replication_slot('s_p')")
    h.snapshot()
    h.execute("UPDATE tx SET amount = 0 WHERE id <= 10", "DELETE FROM tx WHERE id = 11")
    batch = h.batches()[0]
    first = h.engine.apply(batch)
    assert first.changes == 11
    # The same transactions again (e.g. re-sent after a reconnect): nothing applied twice.
    again = h.engine.apply(batch)
    assert (again.changes, again.skipped) == (0, 11)
    h.assert_mirror("tx", ["id", "acct_id", "amount", "status", "ts"])
    h.assert_rollup("vol", TIERS, {"tier": "current_tier"})
    # A heartbeat: no changes, the position moves on, freshness of tables does not.
    before = h.duck("SELECT last_commit_ts FROM headrace.tables ORDER BY table_name")
    beat = h.engine.apply(ChangeBatch((), position=batch.position + 1000))
    assert beat.position == batch.position + 1000
    assert h.engine.position() == batch.position + 1000
    assert h.duck("SELECT lsn FROM headrace.position") == [(batch.position + 1000,)]
    assert h.duck("SELECT last_commit_ts FROM headrace.tables ORDER BY table_name") == before
    # A position never moves back.
    assert h.engine.apply(ChangeBatch((), position=5)).position == batch.position + 1000
