"""Crashes on both sides: the consumer killed with SIGKILL, the server restarted mid-stream.

Every change must come out exactly once. The workload makes that checkable:
rows are inserted with v = 0 and every update bumps v by one, so replaying
the changes in order detects a repeated insert, a lost or repeated update,
and a delete of a row that is not there; the replay must end equal to a
SELECT of the table.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import OLD_KIND, OP, SEQ, ChangeBatch, TableRef, old_name
from headrace.source.postgres.source import PostgresSource
from headrace.source.postgres.source_settings import SourceSettings
from tests.conftest import PgDatabase

T = TableRef("public", "t")
REPO = Path(__file__).resolve().parents[2]
Change = tuple[str, int, int | None, str | None]


def _settings(dsn: str, **overrides: object) -> SourceSettings:
    values: dict[str, object] = {
        "dsn": dsn,
        "tables": (T,),
        "slot": "crash",
        "publication": "p",
        "batch_max_changes": 20,
        "batch_max_wait_s": 0.01,
        "status_interval_s": 0.05,
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
        "slot_busy_wait_s": 20,
        "heartbeat_interval_s": 0.3,
    }
    values.update(overrides)
    return SourceSettings(**values)  # type: ignore[arg-type]


def changes_of(batch: ChangeBatch) -> list[Change]:
    """(op, id, v, note) of each change, in commit order."""
    rows: list[tuple[int, Change]] = []
    for table in batch.tables:
        for row in table.data.to_pylist():
            if row[OP] == "D":
                assert row[OLD_KIND] == "K"
                rows.append((row[SEQ], ("D", row[old_name("id")], None, None)))
            else:
                rows.append((row[SEQ], (row[OP], row["id"], row["v"], row["note"])))
    return [change for _, change in sorted(rows, key=lambda item: item[0])]


class Replay:
    """The table rebuilt from changes, failing on any loss or duplicate it can see."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, int, str | None]] = {}
        self.changes = 0

    def apply(self, change: Change) -> None:
        op, key, v, note = change
        self.changes += 1
        if op == "I":
            assert key not in self.rows, f"row {key} inserted twice"
            assert v == 0
        elif op == "U":
            assert key in self.rows, f"update of missing row {key}"
            assert v == self.rows[key][1] + 1, f"row {key}: v {self.rows[key][1]} -> {v}"
        else:
            assert key in self.rows, f"delete of missing row {key}"
            del self.rows[key]
            return
        assert v is not None
        self.rows[key] = (key, v, note)


def _select(dsn: str) -> dict[int, tuple[int, int, str | None]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, v, note FROM t").fetchall()
    return {row[0]: (row[0], row[1], row[2]) for row in rows}


def _create_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int8 PRIMARY KEY, v int8 NOT NULL, note text)")


def _transaction(conn: psycopg.Connection[tuple[object, ...]], next_id: int) -> int:
    with conn.transaction():
        for _ in range(3):
            conn.execute("INSERT INTO t VALUES (%s, 0, %s)", (next_id, f"row {next_id}"))
            next_id += 1
        conn.execute(
            "UPDATE t SET v = v + 1 WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 2)"
        )
        if next_id % 9 == 0:
            conn.execute("DELETE FROM t WHERE id = (SELECT min(id) FROM t)")
    return next_id


class Writer(threading.Thread):
    """Commits small transactions until stopped."""

    def __init__(self, dsn: str, first_id: int = 1) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.next_id = first_id
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    # After a lost connection a commit may or may not have happened.
                    (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM t").fetchall()
                    self.next_id = max(self.next_id, int(str(last[0])) + 1)
                    while not self.halt.is_set():
                        self.next_id = _transaction(conn, self.next_id)
                        time.sleep(0.002)
            except psycopg.OperationalError:
                time.sleep(0.1)  # the server restarts: write again once it is back

    def stop(self) -> None:
        self.halt.set()
        self.join()


# -- the consumer killed with SIGKILL -----------------------------------------


def _recover(store: Path) -> tuple[int, list[Change]]:
    """The durable position and changes of the store; a torn last line is cut off."""
    if not store.exists():
        return 0, []
    data = store.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        store.write_bytes(complete)
    position, changes = 0, list[Change]()
    for line in complete.splitlines():
        record = json.loads(line)
        position = record["position"]
        changes.extend(tuple(c) for c in record["changes"])
    return position, changes


def driver(dsn: str, store: Path) -> None:
    """The consumer: append each batch to ``store`` (one line), then confirm it."""
    position, _ = _recover(store)
    rng = random.Random()  # noqa: S311 - test randomness, not cryptography
    settings = _settings(dsn, batch_max_changes=rng.choice([3, 20, 200]))
    with PostgresSource(settings) as source, store.open("a") as out:
        for batch in source.batches(position):
            out.write(json.dumps({"position": batch.position, "changes": changes_of(batch)}))
            out.write("\n")
            out.flush()
            source.confirm(batch.position)


def _start_driver(dsn: str, store: Path) -> subprocess.Popen[bytes]:
    # The worktree's src first: the virtualenv's editable install points at one checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.source.test_pg_source_crash", dsn, str(store)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
    )


def test_consumer_killed_at_random_points_resumes_exactly(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    _create_table(pg_db.dsn)
    with PostgresSource(_settings(pg_db.dsn)) as source:
        source.prepare()  # publication and slot exist before the first write
    store = tmp_path / "store.jsonl"
    seed = int(os.environ.get("HEADRACE_TEST_SEED", "0")) or None
    rng = random.Random(seed)  # noqa: S311 - test randomness, not cryptography
    writer = Writer(pg_db.dsn)
    writer.start()
    try:
        for _ in range(6):
            process = _start_driver(pg_db.dsn, store)
            time.sleep(rng.uniform(1.0, 2.5))
            process.kill()
            _, stderr = process.communicate()
            assert process.returncode == -9, stderr.decode()
    finally:
        writer.stop()
    expected = _select(pg_db.dsn)
    process = _start_driver(pg_db.dsn, store)
    try:
        assert _eventually(lambda: _replay(store).rows == expected, timeout=60)
    finally:
        process.kill()
        process.communicate()
    replay = _replay(store)
    assert replay.changes > 50  # the kills happened while changes flowed


def _replay(store: Path) -> Replay:
    replay = Replay()
    for change in _recover(store)[1]:
        replay.apply(change)
    return replay


# -- the server restarted mid-stream ------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as cluster:
        yield cluster


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_mid_stream(own_cluster: ThrowawayPostgres, mode: str) -> None:
    dsn = own_cluster.dsn()
    _create_table(dsn)
    replay = Replay()
    failures: list[BaseException] = []
    with PostgresSource(_settings(dsn, batch_max_changes=5)) as source:
        source.prepare()

        def consume() -> None:
            try:
                for batch in source.batches():
                    for change in changes_of(batch):
                        replay.apply(change)
                    source.confirm(batch.position)
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        try:
            writer = Writer(dsn)
            writer.start()
            for _ in range(2):
                time.sleep(0.8)  # changes flowing
                assert replay.changes > 0
                own_cluster.restart(mode)
            time.sleep(0.5)
            writer.stop()
            expected = _select(dsn)
            assert _eventually(lambda: replay.rows == expected or bool(failures), timeout=30)
            assert not failures
        finally:
            source.stop()
            consumer.join()
        assert source.reconnects == 2
    assert replay.rows == expected


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


if __name__ == "__main__":
    driver(sys.argv[1], Path(sys.argv[2]))
