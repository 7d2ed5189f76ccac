"""Snapshot + stream from the slot's consistent point = the source: no gap, no duplicate.

A writer thread inserts, updates and deletes (also changing keys, also in
multi-statement transactions) before, during and after the copy. The copy
is slowed down by its consumer so that many transactions commit while it
runs. Then the slot's changes (``pg_logical_slot_get_binary_changes`` fed
to the batcher, or the change source streaming from the consistent point)
are applied on top of the snapshot rows, strictly: an insert
of a key the snapshot already has is a duplicate, an update or delete of a
key it lacks is a gap. The result must equal a final SELECT.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest

from headrace.errors import parse_lsn
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import OLD_KIND, OP, SEQ, ChangeBatch, TableRef, old_name
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.snapshot import SnapshotSettings, Snapshotter, same_columns
from headrace.source.postgres.source import PostgresSource
from headrace.source.postgres.source_settings import SourceSettings
from headrace.source.postgres.types import TypeRegistry
from tests.conftest import PgDatabase

Row = dict[str, object]
Key = tuple[object, ...]

SCHEMA = """
CREATE TABLE account (
    id int8 PRIMARY KEY,
    balance numeric(18,2) NOT NULL,
    note text,
    updated_at timestamptz NOT NULL
) WITH (fillfactor = 70);
CREATE TABLE ledger (
    account_id int8 NOT NULL,
    seq int4 NOT NULL,
    amount numeric(18,2),
    memo text,
    PRIMARY KEY (account_id, seq)
);
INSERT INTO account
SELECT g, g * 1.25, CASE WHEN g % 5 = 0 THEN NULL ELSE 'note ' || g END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
FROM generate_series(1, 6000) g;
INSERT INTO ledger SELECT g % 500, g, g * 0.5, 'm' || g FROM generate_series(1, 3000) g;
CREATE PUBLICATION p FOR TABLE account, ledger;
"""


class Writer(threading.Thread):
    """Random committed changes to both tables until stopped."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.random = random.Random(seed)  # noqa: S311 - a reproducible workload, not secrets
        self.stop = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None
        self.next_id = 1_000_000
        self.next_seq = 1_000_000

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        for _ in range(self.random.choice((1, 1, 1, 3))):
                            self.change(conn)
                    self.commits += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def change(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        rnd = self.random
        pick = rnd.random()
        account = rnd.randint(1, 6000)
        if pick < 0.3:
            self.next_id += 1
            conn.execute(
                "INSERT INTO account VALUES (%s, %s, %s, now())",
                (self.next_id, Decimal(rnd.randint(-(10**6), 10**6)) / 100, f"new {self.next_id}"),
            )
        elif pick < 0.6:
            conn.execute(
                "UPDATE account SET balance = balance + 1.01, note = %s, updated_at = now() "
                "WHERE id IN (%s, %s)",
                (rnd.choice((None, "", "x,y", 'q"uote', "multi\nline")), account, self.next_id),
            )
        elif pick < 0.7:
            conn.execute("DELETE FROM account WHERE id = %s", (account,))
        elif pick < 0.75:
            # A key change: the stream sends the old key.
            self.next_id += 1
            conn.execute("UPDATE account SET id = %s WHERE id = %s", (self.next_id, account))
        elif pick < 0.9:
            self.next_seq += 1
            conn.execute(
                "INSERT INTO ledger VALUES (%s, %s, %s, %s)",
                (account % 500, self.next_seq, Decimal(rnd.randint(1, 999)) / 10, None),
            )
        else:
            conn.execute(
                "DELETE FROM ledger WHERE (account_id, seq) IN "
                "(SELECT account_id, seq FROM ledger WHERE account_id = %s LIMIT 2)",
                (account % 500,),
            )

    def wait_for(self, commits: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.commits < commits:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "the writer is stuck"
            time.sleep(0.01)


def normalize(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return value


def apply_batch(state: dict[TableRef, dict[Key, Row]], batch: ChangeBatch) -> int:
    """Apply a batch strictly; returns how many changes it held."""
    changes = []
    for table_changes in batch.tables:
        schema = table_changes.schema
        for row in table_changes.data.to_pylist():
            changes.append((row[SEQ], schema, row))
    for _, schema, row in sorted(changes, key=lambda item: int(str(item[0]))):
        rows = state[schema.table]
        names = [c.name for c in schema.columns]
        new = {n: normalize(row[n]) for n in names}
        key = tuple(new[k] for k in schema.key_columns)
        old_key = key
        if row[OLD_KIND] is not None:
            old_key = tuple(normalize(row[old_name(k)]) for k in schema.key_columns)
        op = row[OP]
        if op == "I":
            assert key not in rows, f"duplicate: {schema.table} {key} is in the snapshot already"
            rows[key] = new
        elif op == "U":
            assert old_key in rows, f"gap: update of {schema.table} {old_key}, not in snapshot"
            del rows[old_key]
            rows[key] = new
        elif op == "D":
            assert old_key in rows, f"gap: delete of {schema.table} {old_key}, not in snapshot"
            del rows[old_key]
        else:
            raise AssertionError(f"unexpected op {op}")
    return len(changes)


def select_rows(pg_db: PgDatabase, table: str, keys: tuple[str, ...]) -> dict[Key, Row]:
    with pg_db.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        cursor = conn.execute(f"SELECT * FROM {table}".encode())
        assert cursor.description is not None
        names = [d.name for d in cursor.description]
        result = {}
        for values in cursor.fetchall():
            row = {n: normalize(v) for n, v in zip(names, values, strict=True)}
            result[tuple(row[k] for k in keys)] = row
        return result


def changes_by_sql(pg_db: PgDatabase, consistent_point: int) -> list[ChangeBatch]:
    """The slot's changes through ``pg_logical_slot_get_binary_changes``, batched."""
    with pg_db.connect() as conn:
        registry = TypeRegistry.load(conn)
    batcher = Batcher(registry)
    batcher.skip_before(consistent_point)
    changes = pg_db.fetchall(
        "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes("
        "'handover', NULL, NULL, 'proto_version', '2', 'publication_names', 'p')"
    )
    for lsn_text, data in changes:
        assert isinstance(data, bytes)
        batcher.feed(parse_lsn(str(lsn_text)), data)
    batch = batcher.take()
    assert batch is not None
    return [batch]


def changes_by_source(
    pg_db: PgDatabase, settings: SnapshotSettings, consistent_point: int
) -> list[ChangeBatch]:
    """The slot's changes streamed by the change source from the consistent point."""
    (row,) = pg_db.fetchall("SELECT pg_current_wal_lsn()::text")
    end = parse_lsn(str(row[0]))
    source_settings = SourceSettings(
        dsn=settings.dsn,
        tables=settings.tables,
        publication="p",
        slot=settings.slot,
        create_publication=False,
        heartbeat_interval_s=0,
    )
    batches = []
    deadline = time.monotonic() + 30
    with PostgresSource(source_settings) as source:
        source.prepare(consistent_point)
        for batch in source.batches(consistent_point):
            batches.append(batch)
            source.confirm(batch.position)
            if batch.position >= end:
                break
            assert time.monotonic() < deadline, "the stream did not reach the end"
    return batches


@pytest.mark.parametrize("stream_with", ["sql", "source"])
def test_snapshot_then_stream_equals_source_under_concurrent_writes(
    pg_db: PgDatabase, stream_with: str
) -> None:
    pg_db.execute(SCHEMA)
    writer = Writer(pg_db.dsn, seed=7)
    writer.start()
    try:
        writer.wait_for(20)
        settings = SnapshotSettings(
            dsn=pg_db.dsn,
            tables=(TableRef.parse("account"), TableRef.parse("ledger")),
            slot="handover",
            publication="p",
            workers=3,
            chunk_rows=250,
            range_pages=8,
            queue_chunks=2,
        )
        snapshotter = Snapshotter(settings)
        state: dict[TableRef, dict[Key, Row]] = {t: {} for t in settings.tables}
        snapshot_schemas = {}
        commits_at_start = writer.commits
        for chunk in snapshotter.chunks():
            snapshot_schemas[chunk.schema.table] = chunk.schema
            keys = chunk.schema.key_columns
            rows = state[chunk.schema.table]
            for row in chunk.rows.to_pylist():
                key = tuple(row[k] for k in keys)
                assert key not in rows, f"the snapshot copied {key} twice"
                rows[key] = {n: normalize(v) for n, v in row.items()}
            time.sleep(0.02)  # a slow consumer: the writer keeps committing meanwhile
        commits_during = writer.commits - commits_at_start
        writer.wait_for(writer.commits + 20)
    finally:
        writer.stop.set()
        writer.join()
    assert writer.error is None, writer.error
    assert commits_during > 20, f"only {commits_during} commits during the copy"
    result = snapshotter.result
    assert result.rows[TableRef.parse("account")] > 5000

    # Stream from the consistent point: the slot's changes, all of them.
    if stream_with == "sql":
        batches = changes_by_sql(pg_db, result.consistent_point)
    else:
        batches = changes_by_source(pg_db, settings, result.consistent_point)
    applied = sum(apply_batch(state, batch) for batch in batches)
    assert applied > 20

    # The stream's schemas are the snapshot's.
    for table_changes in (t for batch in batches for t in batch.tables):
        assert same_columns(table_changes.schema, snapshot_schemas[table_changes.table])
        assert table_changes.schema.relation_oid == (
            snapshot_schemas[table_changes.table].relation_oid
        )

    assert state[TableRef.parse("account")] == select_rows(pg_db, "account", ("id",))
    assert state[TableRef.parse("ledger")] == select_rows(pg_db, "ledger", ("account_id", "seq"))


def test_chunks_carry_the_slots_consistent_point(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    settings = SnapshotSettings(dsn=pg_db.dsn, tables=(TableRef.parse("t"),), slot="cp")
    snapshotter = Snapshotter(settings)
    chunks = list(snapshotter.chunks())
    (row,) = pg_db.fetchall(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cp'"
    )
    assert {c.consistent_point for c in chunks} == {parse_lsn(str(row[0]))}
    assert snapshotter.result.consistent_point == chunks[0].consistent_point
    assert pa.concat_tables(c.rows for c in chunks).num_rows == 2


def test_exported_snapshot_outlives_wal_sender_timeout() -> None:
    # The idle exporting walsender is in command mode: no timeout ends it,
    # so a slow consumer (longer than wal_sender_timeout) still copies it all.
    with ThrowawayPostgres(settings={"wal_sender_timeout": "1s"}) as cluster:
        dsn = cluster.dsn("postgres", unix=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int8 PRIMARY KEY)")
            conn.execute("INSERT INTO t SELECT generate_series(1, 2000)")
        settings = SnapshotSettings(
            dsn=dsn, tables=(TableRef.parse("t"),), slot="slow", chunk_rows=1000, queue_chunks=1
        )
        snapshotter = Snapshotter(settings)
        ids = []
        with psycopg.connect(dsn, autocommit=True) as watcher:
            for chunk in snapshotter.chunks():
                ids.extend(chunk.rows.column("id").to_pylist())
                time.sleep(1.2)
                (senders,) = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
                ).fetchall()
                assert senders == (1,)  # the exporting connection is still there
        assert sorted(ids) == list(range(1, 2001))
