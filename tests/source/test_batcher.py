"""The batcher against real pgoutput output: transactions, streaming, schemas, TOAST."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from headrace.errors import ProtocolError, parse_lsn
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import OLD_KIND, OP, SEQ, TOAST, ChangeBatch, TableSchema
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.protocol import (
    MSG_STREAM_ABORT,
    MSG_STREAM_COMMIT,
    MSG_STREAM_START,
)
from headrace.source.postgres.types import TypeRegistry
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import (
    LogicalSlot,
    acct_slot,
    op_kinds,
    rows_of,
    select,
    table_changes,
)


@pytest.fixture
def slot(pg_db: PgDatabase) -> LogicalSlot:
    return acct_slot(pg_db)


def test_insert_update_delete_truncate(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute(
        "INSERT INTO acct VALUES (1, 'ann', 10.50, '2024-01-02 03:04:05+00', true), "
        "(2, 'bob', NULL, NULL, NULL)"
    )
    db.execute("UPDATE acct SET balance = 11.25 WHERE id = 1")
    db.execute("DELETE FROM acct WHERE id = 2")
    db.execute("TRUNCATE acct")
    batch = slot.batch()
    rows = rows_of(batch, "acct")
    assert [r[OP] for r in rows] == ["I", "I", "U", "D", "T"]
    assert [r[SEQ] for r in rows] == [0, 1, 2, 3, 4]
    first = rows[0]
    assert first["id"] == 1
    assert first["owner"] == "ann"
    assert str(first["balance"]) == "10.50"
    assert first["opened"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert first["active"] is True
    assert rows[1]["owner"] == "bob"
    assert rows[1]["balance"] is None
    assert rows[2]["id"] == 1
    assert str(rows[2]["balance"]) == "11.25"
    assert rows[2][OLD_KIND] is None  # key unchanged, REPLICA IDENTITY DEFAULT
    assert rows[3]["id"] is None
    assert rows[3][OLD_KIND] == "K"
    assert rows[3]["_hr_old_id"] == 2
    assert rows[3]["_hr_old_owner"] is None  # only the key is sent
    assert rows[4]["id"] is None
    assert rows[4][OLD_KIND] is None
    # One transaction per statement: increasing commit LSNs and xids, the two
    # inserts share theirs.
    assert rows[0]["_hr_lsn"] == rows[1]["_hr_lsn"] < rows[2]["_hr_lsn"] < rows[3]["_hr_lsn"]
    assert rows[0]["_hr_xid"] == rows[1]["_hr_xid"] < rows[2]["_hr_xid"]
    assert batch.transactions == 4
    assert batch.first_commit_lsn == rows[0]["_hr_lsn"]
    assert batch.position > int(str(rows[4]["_hr_lsn"]))
    assert batch.last_commit_ts == rows[4]["_hr_commit_ts"]
    schema = batch.tables[0].schema
    assert schema.key_columns == ("id",)
    assert schema.version == 1
    assert batch.tables[0].data.schema == schema.change_schema()


def test_replica_identity_full_sends_old_row(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    db.execute("INSERT INTO acct VALUES (1, 'ann', 1.00, NULL, true)")
    db.execute("UPDATE acct SET balance = 2.00, owner = 'anne' WHERE id = 1")
    db.execute("DELETE FROM acct WHERE id = 1")
    batch = slot.batch()
    rows = rows_of(batch, "acct")
    update, delete = rows[1], rows[2]
    assert update[OLD_KIND] == "O"
    assert update["_hr_old_owner"] == "ann"
    assert str(update["_hr_old_balance"]) == "1.00"
    assert update["owner"] == "anne"
    assert delete[OLD_KIND] == "O"
    assert delete["_hr_old_owner"] == "anne"
    assert delete["_hr_old_active"] is True
    # With REPLICA IDENTITY FULL every column is part of the identity.
    assert _schema_of(batch).key_columns == ("id", "owner", "balance", "opened", "active")


def test_key_change_sends_old_key(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("INSERT INTO acct VALUES (1, 'ann', 1.00, NULL, true)")
    db.execute("UPDATE acct SET id = 5 WHERE id = 1")
    rows = rows_of(slot.batch(), "acct")
    assert rows[1][OP] == "U"
    assert rows[1][OLD_KIND] == "K"
    assert rows[1]["_hr_old_id"] == 1
    assert rows[1]["_hr_old_owner"] is None
    assert rows[1]["id"] == 5
    assert rows[1]["owner"] == "ann"


def test_unchanged_toast_column_is_marked(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("CREATE TABLE doc (id int PRIMARY KEY, title text, body text)")
    db.execute("ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL")
    big = "x" * 5000
    db.execute("INSERT INTO doc VALUES (1, 'a', %s)", (big,))
    db.execute("UPDATE doc SET title = 'b' WHERE id = 1")
    rows = rows_of(slot.batch(), "doc")
    assert rows[0]["body"] == big
    assert rows[0][TOAST] is None
    assert rows[1]["title"] == "b"
    assert rows[1]["body"] is None
    assert rows[1][TOAST] == ["body"]


def test_large_transaction_streams_and_commits_whole(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute(
        "INSERT INTO acct SELECT g, 'owner ' || g, g / 100.0, NULL, g % 2 = 0 "
        "FROM generate_series(1, 3000) g"
    )
    changes = slot.changes(work_mem="64kB")
    kinds = op_kinds(changes)
    assert MSG_STREAM_START in kinds
    assert MSG_STREAM_COMMIT in kinds
    batcher = Batcher(slot.registry())
    for lsn, payload in changes:
        batcher.feed(lsn, payload)
        if payload[0] != MSG_STREAM_COMMIT:
            assert batcher.pending_changes == 0  # nothing before the commit
    assert batcher.pending_transactions == 1
    assert batcher.pending_changes == 3000
    batch = batcher.take()
    assert batch is not None
    rows = rows_of(batch, "acct")
    assert [r["id"] for r in rows] == list(range(1, 3001))
    assert rows[2999]["owner"] == "owner 3000"
    assert {r["_hr_lsn"] for r in rows} == {batch.first_commit_lsn}


def test_streamed_transaction_interleaved_with_others(slot: LogicalSlot) -> None:
    db = slot.db
    with db.connect(autocommit=False) as big:
        big.execute(
            "INSERT INTO acct SELECT g, 'big', 1, NULL, true FROM generate_series(1, 2000) g"
        )
        db.execute("INSERT INTO acct VALUES (100000, 'small', 2, NULL, false)")
        big.execute(
            "INSERT INTO acct SELECT g, 'big', 1, NULL, true FROM generate_series(2001, 4000) g"
        )
        big.commit()
    changes = slot.changes(work_mem="64kB")
    assert MSG_STREAM_START in op_kinds(changes)
    batch = slot.batch_from(changes)
    rows = rows_of(batch, "acct")
    assert rows[0]["owner"] == "small"  # committed first, delivered first
    assert [r["id"] for r in rows[1:]] == list(range(1, 4001))
    assert batch.transactions == 2


def test_aborted_transactions_are_dropped(slot: LogicalSlot) -> None:
    db = slot.db
    with db.connect(autocommit=False) as conn:
        conn.execute("INSERT INTO acct VALUES (1, 'rolled back', 1, NULL, true)")
        conn.rollback()
        # A large one that streams before it is rolled back.
        conn.execute(
            "INSERT INTO acct SELECT g, 'streamed', 1, NULL, true FROM generate_series(10, 3000) g"
        )
        conn.rollback()
        # Savepoints rolled back inside a streamed transaction.
        conn.execute(
            "INSERT INTO acct SELECT g, 'kept', 1, NULL, true FROM generate_series(5000, 6500) g"
        )
        conn.execute("SAVEPOINT a")
        conn.execute(
            "INSERT INTO acct SELECT g, 'undone', 1, NULL, true FROM generate_series(7000, 8500) g"
        )
        conn.execute("SAVEPOINT b")
        conn.execute("INSERT INTO acct VALUES (8999, 'undone too', 1, NULL, true)")
        conn.execute("ROLLBACK TO SAVEPOINT a")
        conn.execute("SAVEPOINT c")
        conn.execute(
            "INSERT INTO acct SELECT g, 'kept sub', 1, NULL, true "
            "FROM generate_series(9000, 10500) g"
        )
        conn.execute("RELEASE SAVEPOINT c")
        conn.commit()
    db.execute("INSERT INTO acct VALUES (2, 'after', 1, NULL, true)")
    changes = slot.changes(work_mem="64kB")
    kinds = op_kinds(changes)
    assert MSG_STREAM_ABORT in kinds
    batch = slot.batch_from(changes)
    rows = rows_of(batch, "acct")
    owners = [r["owner"] for r in rows]
    assert "rolled back" not in owners
    assert "streamed" not in owners
    assert "undone" not in owners
    assert "undone too" not in owners
    assert [r["id"] for r in rows] == [*range(5000, 6501), *range(9000, 10501), 2]
    assert batch.transactions == 2
    assert list(select(db, "SELECT count(*) FROM acct")[0]) == [len(rows)]


def test_schema_versions_follow_alter_table(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("INSERT INTO acct VALUES (1, 'a', 1, NULL, true)")
    db.execute("ALTER TABLE acct ADD COLUMN note text")
    db.execute("INSERT INTO acct VALUES (2, 'b', 2, NULL, true, 'n')")
    db.execute("ALTER TABLE acct DROP COLUMN active")
    db.execute("INSERT INTO acct VALUES (3, 'c', 3, NULL, 'm')")
    db.execute("ALTER TABLE acct ALTER COLUMN balance TYPE numeric(20,4)")
    db.execute("INSERT INTO acct VALUES (4, 'd', 4.1234, NULL, 'o')")
    db.execute("UPDATE acct SET owner = 'e' WHERE id = 4")  # same schema: no new version
    batch = slot.batch()
    parts = table_changes(batch, "acct")
    assert [p.schema.version for p in parts] == [1, 2, 3, 4]
    names = [tuple(c.name for c in p.schema.columns) for p in parts]
    assert names[0] == ("id", "owner", "balance", "opened", "active")
    assert names[1] == ("id", "owner", "balance", "opened", "active", "note")
    assert names[2] == ("id", "owner", "balance", "opened", "note")
    assert str(parts[3].schema.columns[2].arrow_type) == "decimal128(20, 4)"
    assert parts[3].num_rows == 2
    assert str(parts[3].data.column("balance")[0].as_py()) == "4.1234"
    assert parts[1].data.column("note").to_pylist() == ["n"]
    assert [p.data.column(SEQ)[0].as_py() for p in parts] == [0, 1, 2, 3]


def test_alter_inside_a_streamed_transaction(slot: LogicalSlot) -> None:
    db = slot.db
    with db.connect(autocommit=False) as conn:
        conn.execute(
            "INSERT INTO acct SELECT g, 'x', 1, NULL, true FROM generate_series(1, 2000) g"
        )
        conn.execute("ALTER TABLE acct ADD COLUMN extra int DEFAULT 7")
        conn.execute(
            "INSERT INTO acct SELECT g, 'y', 1, NULL, true, g FROM generate_series(3001, 5000) g"
        )
        conn.commit()
    db.execute("INSERT INTO acct VALUES (9999, 'z', 1, NULL, true, 9)")
    changes = slot.changes(work_mem="64kB")
    assert MSG_STREAM_START in op_kinds(changes)
    parts = table_changes(slot.batch_from(changes), "acct")
    assert [p.schema.version for p in parts] == [1, 2]
    assert parts[0].num_rows == 2000
    assert parts[1].data.column("extra").to_pylist() == [*range(3001, 5001), 9]


def test_logical_messages_and_heartbeat_position(slot: LogicalSlot) -> None:
    db = slot.db
    with db.connect(autocommit=False) as conn:
        conn.execute("INSERT INTO acct VALUES (1, 'a', 1, NULL, true)")
        conn.execute("SELECT pg_logical_emit_message(true, 'app', 'in txn')")
        conn.commit()
    db.execute("SELECT pg_logical_emit_message(false, 'headrace.heartbeat', 'beat')")
    batcher = Batcher(slot.registry())
    changes = _changes_through_heartbeat(slot)
    for lsn, payload in changes[:-1]:
        batcher.feed(lsn, payload)
    after_commit = batcher.position
    batcher.feed(*changes[-1])
    batch = batcher.take()
    assert batch is not None
    assert [(m.prefix, m.content, m.transactional) for m in batch.messages] == [
        ("app", b"in txn", True),
        ("headrace.heartbeat", b"beat", False),
    ]
    assert batch.position == batch.messages[1].lsn > after_commit
    assert batcher.take() is None
    # A heartbeat alone makes a batch that only moves the position.
    db.execute("SELECT pg_logical_emit_message(false, 'headrace.heartbeat', 'beat')")
    for lsn, payload in _changes_through_heartbeat(slot):
        batcher.feed(lsn, payload)
    assert batcher.pending_transactions == 0
    assert batcher.has_pending
    beat = batcher.take()
    assert beat is not None
    assert beat.is_empty
    assert beat.position > batch.position


def _changes_through_heartbeat(slot: LogicalSlot) -> list[tuple[int, bytes]]:
    """The slot's changes up to a non-transactional message. Such a message
    (written by a transaction without an xid) becomes visible to decoding once
    the WAL writer flushes it, within wal_writer_delay."""
    changes: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        changes += slot.changes()
        if changes and changes[-1][1][0] == ord("M"):
            return changes
        time.sleep(0.05)
    raise AssertionError("the heartbeat message never became visible")


def test_skip_before_drops_delivered_transactions(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("INSERT INTO acct VALUES (1, 'a', 1, NULL, true)")
    db.execute("INSERT INTO acct VALUES (2, 'b', 1, NULL, true)")
    with db.connect() as conn:
        peek = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, "
            "'proto_version', '2', 'publication_names', 'p')"
        ).fetchall()
    assert peek
    changes = slot.changes()
    first = Batcher(slot.registry())
    # Deliver only the first transaction.
    commits = [i for i, (_, payload) in enumerate(changes) if payload[0] == ord("C")]
    for lsn, payload in changes[: commits[0] + 1]:
        first.feed(lsn, payload)
    delivered = first.take()
    assert delivered is not None
    assert [r["id"] for r in rows_of(delivered, "acct")] == [1]
    # A restarted source gets everything again and resumes after it.
    resumed = Batcher(slot.registry())
    resumed.skip_before(delivered.position)
    for lsn, payload in changes:
        resumed.feed(lsn, payload)
    batch = resumed.take()
    assert batch is not None
    assert [r["id"] for r in rows_of(batch, "acct")] == [2]
    assert batch.transactions == 1


def test_origin_and_type_messages(slot: LogicalSlot, caplog: pytest.LogCaptureFixture) -> None:
    db = slot.db
    db.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    db.execute("CREATE TABLE feel (id int PRIMARY KEY, m mood, ms mood[])")
    origin = f"upstream_{db.name}"  # origins are cluster-wide
    db.execute("SELECT pg_replication_origin_create(%s)", (origin,))
    with db.connect() as conn:
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        with conn.transaction():
            conn.execute("SELECT pg_replication_origin_xact_setup('0/1234', now())")
            conn.execute("INSERT INTO feel VALUES (1, 'happy', '{sad,ok}')")
    changes = slot.changes()
    kinds = op_kinds(changes)
    assert ord("O") in kinds  # Origin
    assert ord("Y") in kinds  # Type (the enum)
    # Without catalog access the enum is known by name only: text, one warning.
    with caplog.at_level(logging.WARNING):
        batch = slot_batch_from_registryless(changes)
    rows = rows_of(batch, "feel")
    assert rows[0]["m"] == "happy"
    assert rows[0]["ms"] == "{sad,ok}"
    assert any("mood" in r.getMessage() for r in caplog.records)
    # With the catalog it is an enum: text without warnings, arrays as lists.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = rows_of(slot.batch_from(changes), "feel")
    assert rows[0]["m"] == "happy"
    assert rows[0]["ms"] == ["sad", "ok"]
    assert not caplog.records


def slot_batch_from_registryless(changes: list[tuple[int, bytes]]) -> ChangeBatch:
    batcher = Batcher()
    for lsn, payload in changes:
        batcher.feed(lsn, payload)
    batch = batcher.take()
    assert batch is not None
    return batch


def test_take_between_transactions_and_counters(slot: LogicalSlot) -> None:
    db = slot.db
    batcher = Batcher(slot.registry())
    assert batcher.take() is None
    db.execute("INSERT INTO acct SELECT g, 'a', 1, NULL, true FROM generate_series(1, 5) g")
    db.execute("INSERT INTO acct VALUES (6, 'b', 1, NULL, true)")
    changes = slot.changes()
    begin_second = [i for i, (_, p) in enumerate(changes) if p[0] == ord("B")][1]
    for lsn, payload in changes[: begin_second + 2]:
        batcher.feed(lsn, payload)
    assert batcher.in_transaction
    assert batcher.pending_transactions == 1
    assert batcher.pending_changes == 5
    batch = batcher.take()
    assert batch is not None
    assert batch.num_changes == 5  # the open transaction stays behind
    for lsn, payload in changes[begin_second + 2 :]:
        batcher.feed(lsn, payload)
    batch = batcher.take()
    assert batch is not None
    assert [r["id"] for r in rows_of(batch, "acct")] == [6]
    assert batch.tables[0].data.column(SEQ).to_pylist() == [0]


def test_many_tables_keep_global_order(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("CREATE TABLE other (k text PRIMARY KEY, v int)")
    with db.connect(autocommit=False) as conn:
        for i in range(5):
            conn.execute("INSERT INTO acct VALUES (%s, 'a', 1, NULL, true)", (i,))
            conn.execute("INSERT INTO other VALUES (%s, %s)", (f"k{i}", i))
        conn.commit()
    batch = slot.batch()
    seqs = {t.table.name: t.data.column(SEQ).to_pylist() for t in batch.tables}
    assert seqs == {"acct": [0, 2, 4, 6, 8], "other": [1, 3, 5, 7, 9]}


def test_concurrent_writers_every_row_once(slot: LogicalSlot) -> None:
    db = slot.db

    def write(offset: int) -> None:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            for i in range(50):
                conn.execute("INSERT INTO acct VALUES (%s, 'w', 1, NULL, true)", (offset + i,))

    threads = [threading.Thread(target=write, args=(n * 1000,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = rows_of(slot.batch(), "acct")
    assert sorted(r["id"] for r in rows) == sorted(
        n * 1000 + i for n in range(3) for i in range(50)
    )
    lsns = [int(str(r["_hr_lsn"])) for r in rows]
    assert lsns == sorted(lsns)


def _schema_of(batch: ChangeBatch) -> TableSchema:
    return batch.tables[0].schema


def test_memoryview_payloads_give_the_same_batch(slot: LogicalSlot) -> None:
    db = slot.db
    db.execute("INSERT INTO acct SELECT g, 'a', g, NULL, true FROM generate_series(1, 2000) g")
    db.execute("UPDATE acct SET owner = 'b' WHERE id < 10")
    changes = slot.changes(work_mem="64kB")
    assert MSG_STREAM_START in op_kinds(changes)
    from_bytes = slot.batch_from(changes)
    batcher = Batcher(slot.registry())
    for lsn, payload in changes:
        # As the replication connection hands them over: views of a bigger buffer.
        batcher.feed(lsn, memoryview(b"w" + payload)[1:])
    from_views = batcher.take()
    assert from_views is not None
    assert [t.data for t in from_views.tables] == [t.data for t in from_bytes.tables]


def test_two_phase_transactions_emit_at_commit_prepared(
    two_phase_cluster: ThrowawayPostgres,
) -> None:
    dsn = two_phase_cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE tp (id int PRIMARY KEY, v text)")
        conn.execute("CREATE PUBLICATION tp_pub FOR TABLE tp")
        conn.execute(
            "SELECT pg_create_logical_replication_slot('tp_slot', 'pgoutput', false, true)"
        )
        conn.execute("BEGIN")
        conn.execute("INSERT INTO tp VALUES (1, 'committed later')")
        conn.execute("PREPARE TRANSACTION 'g1'")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO tp VALUES (2, 'rolled back')")
        conn.execute("PREPARE TRANSACTION 'g2'")
        conn.execute("INSERT INTO tp VALUES (3, 'plain')")
        conn.execute("ROLLBACK PREPARED 'g2'")
        conn.execute("COMMIT PREPARED 'g1'")
        rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('tp_slot', NULL, NULL, "
            "'proto_version', '3', 'publication_names', 'tp_pub', 'two_phase', 'on')"
        ).fetchall()
        changes = [(parse_lsn(str(lsn)), bytes(data)) for lsn, data in rows]
        registry = TypeRegistry.load(conn)
    assert {chr(p[0]) for _, p in changes} >= {"b", "P", "K", "r"}
    batcher = Batcher(registry)
    for lsn, payload in changes:
        batcher.feed(lsn, payload)
    batch = batcher.take()
    assert batch is not None
    assert [(r["id"], r["v"]) for r in rows_of(batch, "tp")] == [
        (3, "plain"),
        (1, "committed later"),
    ]
    assert batch.transactions == 2


def test_messages_fed_in_bulk_give_the_same_batches(slot: LogicalSlot) -> None:
    """feed_many (how the source feeds a drained read) equals feed one message at a time,
    however the stream is cut: plain, streamed and aborted transactions, a truncate, a
    schema change, a logical message."""
    db = slot.db
    db.execute("INSERT INTO acct SELECT g, 'a', g, NULL, true FROM generate_series(1, 300) g")
    with db.connect(autocommit=False) as big:
        big.execute(
            "INSERT INTO acct SELECT g, 'big', 1, NULL, true FROM generate_series(301, 2300) g"
        )
        db.execute("UPDATE acct SET owner = 'b', balance = balance + 1 WHERE id % 7 = 0")
        big.execute("DELETE FROM acct WHERE id BETWEEN 10 AND 40")
        big.commit()
    with db.connect(autocommit=False) as aborted:
        aborted.execute("INSERT INTO acct VALUES (99999, 'gone', 1, NULL, true)")
        aborted.rollback()
    db.execute("SELECT pg_logical_emit_message(true, 'hr', 'mark')")
    db.execute("ALTER TABLE acct ADD COLUMN note text")
    db.execute("UPDATE acct SET note = 'n' WHERE id < 5")
    db.execute("TRUNCATE acct")
    db.execute("INSERT INTO acct VALUES (1, 'again', 1, NULL, true, 'x')")
    changes = slot.changes(work_mem="64kB")
    assert MSG_STREAM_START in op_kinds(changes)
    one_by_one = slot.batch_from(changes)
    lsns = [lsn for lsn, _ in changes]
    payloads = [payload for _, payload in changes]
    for cut in (len(changes), 1, 7, 101, 4096):
        batcher = Batcher(slot.registry())
        for start in range(0, len(changes), cut):
            batcher.feed_many(lsns[start : start + cut], payloads[start : start + cut])
        in_bulk = batcher.take()
        assert in_bulk is not None
        assert [t.data for t in in_bulk.tables] == [t.data for t in one_by_one.tables], cut
        assert [m.content for m in in_bulk.messages] == [m.content for m in one_by_one.messages]
        assert in_bulk.position == one_by_one.position


def test_an_empty_message_in_bulk_is_reported_where_it_is(slot: LogicalSlot) -> None:
    slot.db.execute("INSERT INTO acct VALUES (1, 'a', 1, NULL, true)")
    changes = slot.changes()
    lsns = [lsn for lsn, _ in changes] + [12345]
    payloads = [payload for _, payload in changes] + [b""]
    batcher = Batcher(slot.registry())
    with pytest.raises(ProtocolError, match="empty message") as raised:
        batcher.feed_many(lsns, payloads)
    assert raised.value.lsn == 12345
    batch = batcher.take()  # what came before it stays
    assert batch is not None
    assert [r["id"] for r in rows_of(batch, "acct")] == [1]
