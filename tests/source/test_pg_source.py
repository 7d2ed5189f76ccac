"""PostgresSource against a real PostgreSQL: streams, positions, heartbeats, reconnects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from headrace.errors import SourceError
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import OLD_KIND, OP, ChangeBatch, TableRef, old_name
from headrace.source.postgres import preflight
from headrace.source.postgres.replication import parse_pg_lsn
from headrace.source.postgres.source import HEARTBEAT_PREFIX, PostgresSource
from headrace.source.postgres.source_settings import SourceSettings
from tests.conftest import PgDatabase

T = TableRef("public", "t")
Row = tuple[object, ...]


def _settings(pg_db: PgDatabase, **overrides: object) -> SourceSettings:
    return _settings_for(pg_db.dsn, **overrides)


def _settings_for(dsn: str, **overrides: object) -> SourceSettings:
    values: dict[str, object] = {
        "dsn": dsn,
        "tables": (T,),
        "slot": "s",
        "publication": "p",
        "batch_max_wait_s": 0.02,
        "status_interval_s": 0.1,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.5,
        "heartbeat_interval_s": 0,
    }
    values.update(overrides)
    return SourceSettings(**values)  # type: ignore[arg-type]


class Mirror:
    """The table rebuilt from changes, checking every change against the state before it."""

    def __init__(self) -> None:
        self.rows: dict[object, Row] = {}
        self.changes = 0
        self.positions: list[int] = []
        self.batches: list[ChangeBatch] = []

    def apply(self, batch: ChangeBatch) -> None:
        assert not self.positions or batch.position >= self.positions[-1]
        self.positions.append(batch.position)
        self.batches.append(batch)
        for table in batch.tables:
            columns = [c.name for c in table.schema.columns]
            for row in table.data.to_pylist():
                self.changes += 1
                self._apply_row(row, columns)

    def _apply_row(self, row: dict[str, object], columns: list[str]) -> None:
        op = row[OP]
        if op == "T":
            self.rows.clear()
            return
        if op == "D":
            assert row[OLD_KIND] == "K"
            key = row[old_name("id")]
            assert key in self.rows, f"delete of a missing row {key} (duplicate delete?)"
            del self.rows[key]
            return
        values = tuple(row[c] for c in columns)
        key = row["id"]
        if op == "I":
            assert key not in self.rows, f"insert of an existing row {key} (duplicate?)"
        else:
            assert key in self.rows, f"update of a missing row {key}"
            before = self.rows[key]
            # Every update bumps v by one: a lost or repeated update breaks the chain.
            assert row["v"] == before[1] + 1, f"update chain broken for {key}"  # type: ignore[operator]
        self.rows[key] = values


def _select(pg_db: PgDatabase) -> dict[object, Row]:
    return {row[0]: row for row in pg_db.fetchall("SELECT id, v, note FROM t ORDER BY id")}


def _create_table(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY, v int8 NOT NULL, note text)")


def _workload(pg_db: PgDatabase, first_id: int, transactions: int) -> int:
    """Inserts, updates (v + 1) and deletes in several transactions; returns the next id."""
    next_id = first_id
    with pg_db.connect(autocommit=False) as conn:
        for txn in range(transactions):
            for _ in range(3):
                conn.execute("INSERT INTO t VALUES (%s, 0, %s)", (next_id, f"row {next_id}"))
                next_id += 1
            conn.execute(
                "UPDATE t SET v = v + 1, note = note || '+' WHERE id IN "
                "(SELECT id FROM t ORDER BY random() LIMIT 2)"
            )
            if txn % 3 == 2:
                conn.execute("DELETE FROM t WHERE id = (SELECT min(id) FROM t)")
            conn.commit()
    return next_id


def _slot_confirmed(pg_db: PgDatabase, slot: str = "s") -> int:
    rows = pg_db.fetchall(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return parse_pg_lsn(str(rows[0][0]))


def _current_lsn(pg_db: PgDatabase) -> int:
    return parse_pg_lsn(str(pg_db.fetchall("SELECT pg_current_wal_lsn()::text")[0][0]))


@contextmanager
def _deadline(source: PostgresSource, seconds: float) -> Iterator[None]:
    """Stop the source after ``seconds`` at most, so a failing test cannot hang."""
    timer = threading.Timer(seconds, source.stop)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _consume_until(
    source: PostgresSource,
    mirror: Mirror,
    done: Callable[[], bool],
    *,
    start: int = 0,
    confirm: bool = True,
    seconds: float = 20,
) -> None:
    with _deadline(source, seconds):
        for batch in source.batches(start):
            mirror.apply(batch)
            if confirm:
                source.confirm(batch.position)
            if done():
                return
    raise AssertionError("the source stopped before the expected changes arrived")


def test_stream_equals_select(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    mirror = Mirror()
    with PostgresSource(_settings(pg_db)) as source:
        source.prepare()
        _workload(pg_db, 1, 20)
        expected = _select(pg_db)
        _consume_until(source, mirror, lambda: mirror.rows == expected)
        assert source.delivered_position == mirror.positions[-1]
    assert mirror.changes == 20 * 5 + 20 // 3


def test_batches_end_on_transaction_boundaries(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    mirror = Mirror()
    with PostgresSource(_settings(pg_db, batch_max_changes=10)) as source:
        source.prepare()
        with pg_db.connect(autocommit=False) as conn:
            for txn in range(10):
                for i in range(7):
                    conn.execute("INSERT INTO t VALUES (%s, 0, 'x')", (txn * 10 + i,))
                conn.commit()
        _consume_until(source, mirror, lambda: mirror.changes >= 70)
    assert len(mirror.rows) == 70
    sizes = [(b.transactions, b.num_changes) for b in mirror.batches if not b.is_empty]
    assert all(changes == 7 * transactions for transactions, changes in sizes)
    assert all(changes < 10 + 7 for _, changes in sizes)  # cut once 10 are pending


def test_a_waiting_consumer_gets_the_changes_before_batch_max_wait(pg_db: PgDatabase) -> None:
    """With batch_max_wait_s at 30 s, a consumer that says it waits gets each transaction
    at once; one that does not gets nothing before the wait is over."""
    _create_table(pg_db)
    with PostgresSource(_settings(pg_db, batch_max_wait_s=30.0)) as source:
        source.prepare()
        waiting = threading.Event()
        source.consumer_waiting = waiting.is_set
        received: list[tuple[float, ChangeBatch]] = []
        streaming = threading.Thread(
            target=lambda: received.extend((time.monotonic(), b) for b in source.batches())
        )
        streaming.start()
        try:
            pg_db.execute("INSERT INTO t VALUES (1, 0, 'held')")
            time.sleep(1.0)  # far past the drain's polls, far short of batch_max_wait_s
            assert not [b for _, b in received if not b.is_empty]
            waiting.set()
            asked = time.monotonic()
            assert _eventually(lambda: any(not b.is_empty for _, b in received))
            pg_db.execute("INSERT INTO t VALUES (2, 0, 'at once')")
            assert _eventually(lambda: sum(b.num_changes for _, b in received) == 2)
        finally:
            source.stop()
            streaming.join(timeout=10)
    handed = [(at, b) for at, b in received if not b.is_empty]
    assert [b.num_changes for _, b in handed] == [1, 1]
    assert handed[0][0] - asked < 1.0


def test_a_busy_consumer_gets_the_small_batches_held_for_it(pg_db: PgDatabase) -> None:
    """Up to hold_while_busy changes stay pending past batch_max_wait_s while the consumer
    is busy, and go to it in one batch when it waits; more are cut on time as usual."""
    _create_table(pg_db)
    with PostgresSource(_settings(pg_db, batch_max_wait_s=0.02)) as source:
        source.prepare()
        waiting = threading.Event()
        source.consumer_waiting = waiting.is_set
        source.hold_while_busy = 5
        received: list[ChangeBatch] = []
        streaming = threading.Thread(target=lambda: received.extend(source.batches()))
        streaming.start()

        def handed() -> list[int]:
            return [b.num_changes for b in received if not b.is_empty]

        try:
            for row in range(3):  # 3 transactions, 3 changes: held
                pg_db.execute("INSERT INTO t VALUES (%s, 0, 'held')", (row,))
            time.sleep(0.5)  # 25 times batch_max_wait_s
            assert handed() == []
            with pg_db.connect(autocommit=False) as conn:  # 6 pending: cut on time
                for row in range(3, 6):
                    conn.execute("INSERT INTO t VALUES (%s, 0, 'cut')", (row,))
                conn.commit()
            assert _eventually(lambda: handed() == [6])
            pg_db.execute("INSERT INTO t VALUES (6, 0, 'held again')")
            time.sleep(0.3)
            assert handed() == [6]
            waiting.set()
            assert _eventually(lambda: handed() == [6, 1])
        finally:
            source.stop()
            streaming.join(timeout=10)


def test_large_backlog_read_ahead_while_decoding(pg_db: PgDatabase) -> None:
    """Batches big enough that the connection reads ahead during their decoding."""
    _create_table(pg_db)
    mirror = Mirror()
    with PostgresSource(_settings(pg_db, batch_max_changes=3000)) as source:
        source.prepare()
        with pg_db.connect(autocommit=False) as conn:
            for txn in range(20):
                conn.execute(
                    "INSERT INTO t SELECT g, 0, 'bulk ' || g "
                    "FROM generate_series(%s::int8, %s::int8) g",
                    (txn * 1000, txn * 1000 + 999),
                )
                conn.execute("UPDATE t SET v = v + 1 WHERE id % 1000 = 7")
                conn.commit()
        expected = _select(pg_db)
        _consume_until(source, mirror, lambda: mirror.rows == expected)
    sizes = [b.num_changes for b in mirror.batches if not b.is_empty]
    assert max(sizes) >= 3000  # the read-ahead ran
    assert sum(sizes) == 20 * 1000 + sum(range(1, 21))


def test_slot_never_passes_the_confirmed_position(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    with PostgresSource(_settings(pg_db)) as source:
        created_at = _slot_confirmed(pg_db) if source.prepare() else 0
        mirror = Mirror()
        # The stream runs in a thread (as under an engine); confirm() comes from here.
        streaming = threading.Thread(target=_apply_all, args=(source.batches(), mirror))
        streaming.start()
        try:
            _workload(pg_db, 1, 4)
            expected = _select(pg_db)
            assert _eventually(lambda: mirror.rows == expected)
            time.sleep(0.3)  # several status intervals: received, nothing confirmed
            assert _slot_confirmed(pg_db) == created_at
            first = mirror.positions[0]
            source.confirm(first)
            assert _eventually(lambda: _slot_confirmed(pg_db) == first)
            source.confirm(first - 1)  # backwards: ignored
            assert source.confirmed_position == first
            time.sleep(0.3)
            assert _slot_confirmed(pg_db) == first
        finally:
            source.stop()
            streaming.join()
    # Closing sends the last confirmed position, nothing more.
    assert _slot_confirmed(pg_db) == first


def test_resume_from_a_stored_position_skips_what_was_stored(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    first_run = Mirror()
    with PostgresSource(_settings(pg_db)) as source:
        source.prepare()
        _workload(pg_db, 1, 6)
        expected = _select(pg_db)
        # Consume without confirming: the slot stays behind the "store".
        _consume_until(source, first_run, lambda: first_run.rows == expected, confirm=False)
    stored = first_run.positions[-1]
    _workload(pg_db, 100, 4)
    expected = _select(pg_db)
    with PostgresSource(_settings(pg_db)) as source:
        second_run = Mirror()
        second_run.rows = dict(first_run.rows)
        _consume_until(source, second_run, lambda: second_run.rows == expected, start=stored)
    assert second_run.changes == 4 * 5 + 1  # only the new transactions


def test_reconnects_after_the_walsender_is_terminated(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    mirror = Mirror()
    with PostgresSource(_settings(pg_db, batch_max_changes=5)) as source:
        source.prepare()
        streaming = threading.Thread(target=_apply_all, args=(source.batches(), mirror))
        streaming.start()
        try:
            next_id = _workload(pg_db, 1, 10)
            terminated: list[int] = []
            for _ in range(2):
                # Kill the walsender while changes flow, then write more.
                assert _eventually(lambda: source.backend_pid not in (None, *terminated))
                pid = source.backend_pid
                assert pid is not None
                pg_db.execute(f"SELECT pg_terminate_backend({pid})")
                terminated.append(pid)
                next_id = _workload(pg_db, next_id, 10)
            expected = _select(pg_db)
            assert _eventually(lambda: mirror.rows == expected, timeout=20)
        finally:
            source.stop()
            streaming.join()
        assert source.reconnects == 2
    assert mirror.changes == 30 * 5 + 3 * (10 // 3)


def test_heartbeat_advances_an_idle_slot(pg_db: PgDatabase) -> None:
    """Writes to a table outside the publication must not pin WAL forever."""
    _create_table(pg_db)
    pg_db.execute("CREATE TABLE elsewhere (v text)")
    settings = _settings(pg_db, heartbeat_interval_s=0.3)
    with PostgresSource(settings) as source:
        source.prepare()
        started = time.monotonic()
        heartbeats: list[ChangeBatch] = []
        written_up_to: int | None = None
        with _deadline(source, 30):
            for batch in source.batches():
                assert batch.is_empty
                if not any(m.prefix == HEARTBEAT_PREFIX for m in batch.messages):
                    continue  # position-only batches: not confirmed, to test heartbeats alone
                heartbeats.append(batch)
                source.confirm(batch.position)
                if written_up_to is None:
                    pg_db.execute(
                        "INSERT INTO elsewhere "
                        "SELECT repeat('x', 500) FROM generate_series(1, 2000)"
                    )
                    written_up_to = _current_lsn(pg_db)
                elif batch.position > written_up_to:
                    break
        assert written_up_to is not None
        assert time.monotonic() - started >= 0.3
        assert source.heartbeats >= 2
        assert _eventually(lambda: _slot_confirmed(pg_db) > written_up_to)
        lag = source.slot_lag()
        assert lag is not None
        assert lag.wal_status == "reserved"
        assert lag.unconfirmed_bytes < 1_000_000  # the 1 MB written elsewhere is released
        retained = source.retained_wal_bytes()
        assert retained is not None
        assert retained >= 0


def test_slot_held_by_another_consumer(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    with PostgresSource(_settings(pg_db)) as first:
        first.prepare()
        streaming = threading.Thread(target=_apply_all, args=(first.batches(), Mirror()))
        streaming.start()
        try:
            assert _eventually(lambda: first.backend_pid is not None)
            with (
                PostgresSource(_settings(pg_db, slot_busy_wait_s=0.3)) as second,
                _deadline(second, 10),
                pytest.raises(preflight.SlotInUseError) as caught,
            ):
                next(iter(second.batches()))
        finally:
            first.stop()
            streaming.join()
        assert f"PID {first.backend_pid}" in caught.value.what or "PID" in caught.value.what


def test_temporary_slot_does_not_pretend_to_resume(pg_db: PgDatabase) -> None:
    _create_table(pg_db)
    settings = _settings(pg_db, temporary_slot=True, slot="temp")
    mirror = Mirror()
    failures: list[BaseException] = []

    def stream() -> None:
        try:
            _apply_all(source.batches(), mirror)
        except SourceError as exc:
            failures.append(exc)

    with PostgresSource(settings) as source:
        source.prepare()
        streaming = threading.Thread(target=stream)
        streaming.start()
        try:
            assert _eventually(lambda: source.backend_pid is not None)
            _workload(pg_db, 1, 1)
            assert _eventually(lambda: mirror.changes == 5)
            pg_db.execute(f"SELECT pg_terminate_backend({source.backend_pid})")
            assert _eventually(lambda: bool(failures))
        finally:
            source.stop()
            streaming.join()
    (failure,) = failures
    assert isinstance(failure, SourceError)
    assert "temporary slot temp" in failure.what
    assert "--slot" in failure.fix


def _apply_all(batches: Iterator[ChangeBatch], mirror: Mirror) -> None:
    for batch in batches:
        mirror.apply(batch)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_prepared_transaction_arrives_at_commit_prepared_across_a_reconnect(
    two_phase_cluster: ThrowawayPostgres,
) -> None:
    """headrace does not ask for two-phase decoding: a prepared transaction comes whole
    at its COMMIT PREPARED, even when the stream reconnected since its PREPARE."""
    dsn = two_phase_cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int8 PRIMARY KEY, v int8 NOT NULL, note text)")
    settings = _settings_for(dsn, slot="s2pc", publication="p2pc")
    mirror = Mirror()
    with PostgresSource(settings) as source, psycopg.connect(dsn, autocommit=True) as conn:
        source.prepare()
        streaming = threading.Thread(target=_apply_all, args=(source.batches(), mirror))
        streaming.start()
        try:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (1, 0, 'prepared')")
            conn.execute("PREPARE TRANSACTION 'g1'")
            conn.execute("INSERT INTO t VALUES (2, 0, 'plain')")
            assert _eventually(lambda: 2 in mirror.rows)
            assert 1 not in mirror.rows
            pid = source.backend_pid
            conn.execute(f"SELECT pg_terminate_backend({pid})")
            assert _eventually(lambda: source.backend_pid not in (None, pid))
            conn.execute("COMMIT PREPARED 'g1'")
            conn.execute("INSERT INTO t VALUES (3, 0, 'after')")
            assert _eventually(lambda: set(mirror.rows) == {1, 2, 3}, timeout=20)
        finally:
            source.stop()
            streaming.join()
    assert mirror.rows[1] == (1, 0, "prepared")


def test_closing_while_changes_stream_leaves_the_slot_at_the_confirmed_position(
    pg_db: PgDatabase,
) -> None:
    """A stop while the server is still sending: the position confirmed last must reach
    the slot before the connection closes (the stream is ended with CopyDone, not cut)."""
    _create_table(pg_db)
    stop_writing = threading.Event()

    def write() -> None:
        with pg_db.connect() as conn:
            for i in range(1, 1_000_000):
                if stop_writing.is_set():
                    return
                conn.execute(
                    "INSERT INTO t SELECT g, 0, repeat('x', 200) FROM "
                    f"generate_series({i * 500}, {i * 500 + 499}) g"
                )

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(5):
            with PostgresSource(_settings(pg_db, batch_max_changes=200)) as source:
                source.prepare()
                with _deadline(source, 20):
                    for count, batch in enumerate(source.batches(_slot_confirmed(pg_db))):
                        source.confirm(batch.position)
                        if count == 20:
                            last = batch.position
                            break
            assert _slot_confirmed(pg_db) == last
    finally:
        stop_writing.set()
        writer.join()
