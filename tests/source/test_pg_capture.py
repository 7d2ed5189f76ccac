"""``headrace capture``: JSON lines of changes from a real PostgreSQL, run as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
from typer.testing import CliRunner

from headrace.cli.capture import json_safe
from headrace.cli.main import app
from tests.conftest import PgDatabase

HEADRACE = str(Path(sys.executable).parent / "headrace")


class Capture:
    """A running ``headrace capture`` whose stdout lines are collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [HEADRACE, "capture", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[dict[str, Any]] = []
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,))
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.append(json.loads(line))

    def wait_for(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise AssertionError(f"{len(self.lines)} of {count} lines; stderr: {stderr}")
            time.sleep(0.05)
        return self.lines

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; returns the exit code and stderr."""
        self.process.send_signal(signal.SIGINT)
        _, stderr = self.process.communicate(timeout=20)
        self._reader.join()
        return self.process.returncode, stderr.decode()


@contextmanager
def capture(*args: str) -> Iterator[Capture]:
    running = Capture(list(args))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.communicate()


def _slot_exists(pg_db: PgDatabase, name: str) -> bool:
    rows = pg_db.fetchall("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,))
    return bool(rows)


def _wait_for_slot(pg_db: PgDatabase, timeout: float = 20) -> None:
    """Until the capture streams (its slot is active), so later writes are captured."""
    deadline = time.monotonic() + timeout
    while not pg_db.fetchall("SELECT 1 FROM pg_replication_slots WHERE active"):
        assert time.monotonic() < deadline, "capture did not start streaming"
        time.sleep(0.05)


def test_help_documents_every_flag() -> None:
    result = CliRunner().invoke(app, ["capture", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--dsn", "--table", "--slot", "--publication", "--from-lsn", "--snapshot"):
        assert flag in result.output


def test_changes_as_json_lines_and_ctrl_c_exits_0(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE t (id int8 PRIMARY KEY, amount numeric(18,2), raw bytea, "
        "at timestamptz, span interval, ratio float8, big text)"
    )
    pg_db.execute("ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL")
    with capture("--dsn", pg_db.dsn, "--table", "t") as running:
        _wait_for_slot(pg_db)
        pg_db.execute(
            "INSERT INTO t VALUES (1, 12.50, '\\x00ff', '2024-05-06 07:08:09.123456+02', "
            "'1 year 2 mons 3 days 04:05:06.5', 'NaN', repeat('x', 10000))"
        )
        pg_db.execute("UPDATE t SET amount = 13 WHERE id = 1")
        pg_db.execute("DELETE FROM t WHERE id = 1")
        lines = running.wait_for(3)
        code, stderr = running.interrupt()
    assert code == 0, stderr
    insert, update, delete = lines
    assert insert["table"] == "public.t"
    assert insert["op"] == "I"
    assert insert["new"] == {
        "id": 1,
        "amount": "12.50",
        "raw": "00ff",
        "at": "2024-05-06T05:08:09.123456+00:00",
        "span": "P1Y2M3DT4H5M6.5S",
        "ratio": "NaN",
        "big": "x" * 10000,
    }
    assert insert["old"] is None
    assert insert["unchanged_toast"] == []
    assert isinstance(insert["xid"], int)
    assert insert["commit_ts"].endswith("+00:00")
    assert insert["lsn"].count("/") == 1
    # The TOASTed column did not change: PostgreSQL does not send it.
    assert update["op"] == "U"
    assert update["new"]["amount"] == "13.00"
    assert update["unchanged_toast"] == ["big"]
    assert update["new"]["big"] is None
    assert delete["op"] == "D"
    assert delete["new"] is None
    assert delete["old"] == {"id": 1}
    assert [line["lsn"] for line in lines] == sorted(line["lsn"] for line in lines)
    # The default slot was temporary: gone with the process.
    assert not pg_db.fetchall("SELECT 1 FROM pg_replication_slots")


def test_a_large_transaction_is_printed_whole_a_piece_at_a_time(pg_db: PgDatabase) -> None:
    """More changes than --piece-changes in one transaction: spilled while it arrives,
    printed in pieces, every change once and in order."""
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY, v text)")
    with capture("--dsn", pg_db.dsn, "--table", "t", "--piece-changes", "7") as running:
        _wait_for_slot(pg_db)
        pg_db.execute(
            "BEGIN; INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 40) g; "
            "UPDATE t SET v = 'w' WHERE id % 3 = 0; COMMIT"
        )
        lines = running.wait_for(53)
        code, stderr = running.interrupt()
    assert code == 0, stderr
    assert [line["op"] for line in lines] == ["I"] * 40 + ["U"] * 13
    assert [line["new"]["id"] for line in lines[:40]] == list(range(1, 41))
    assert [line["new"]["id"] for line in lines[40:]] == list(range(3, 40, 3))
    assert len({line["lsn"] for line in lines}) == 1


def test_named_slot_resumes_without_duplicates(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY)")
    args = ("--dsn", pg_db.dsn, "--table", "public.t", "--slot", "cap")
    with capture(*args) as running:
        _wait_for_slot(pg_db)
        for i in range(3):
            pg_db.execute(f"INSERT INTO t VALUES ({i})")
        first = running.wait_for(3)
        code, _ = running.interrupt()
    assert code == 0
    assert _slot_exists(pg_db, "cap")
    for i in range(3, 5):
        pg_db.execute(f"INSERT INTO t VALUES ({i})")  # while no capture runs
    with capture(*args) as running:
        second = running.wait_for(2)
        _wait_for_slot(pg_db)
        time.sleep(0.5)  # nothing else may come
        code, _ = running.interrupt()
    assert code == 0
    assert [line["new"]["id"] for line in first + running.lines] == [0, 1, 2, 3, 4]
    assert second == running.lines
    # Resuming after an explicit position re-reads from there (slot permitting).
    with capture(*args, "--from-lsn", first[-1]["lsn"]) as running:
        _wait_for_slot(pg_db)
        time.sleep(0.5)
        code, _ = running.interrupt()
    assert code == 0
    assert running.lines == []  # the slot already confirmed everything printed


def test_snapshot_then_stream(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY, note text)")
    pg_db.execute("INSERT INTO t SELECT g, 'old ' || g FROM generate_series(1, 5) g")
    with capture("--dsn", pg_db.dsn, "--table", "t", "--snapshot") as running:
        snapshot = running.wait_for(5)
        _wait_for_slot(pg_db)
        pg_db.execute("INSERT INTO t VALUES (6, 'new')")
        lines = running.wait_for(6)
        code, stderr = running.interrupt()
    assert code == 0, stderr
    assert sorted(line["new"]["id"] for line in snapshot[:5]) == [1, 2, 3, 4, 5]
    assert {line["op"] for line in snapshot[:5]} == {"S"}
    assert lines[5]["op"] == "I"
    assert lines[5]["new"] == {"id": 6, "note": "new"}
    # The snapshot's slot was made for this run only.
    assert not pg_db.fetchall("SELECT 1 FROM pg_replication_slots")


def test_errors_are_explained_without_traceback(pg_db: PgDatabase) -> None:
    result = subprocess.run(
        [HEADRACE, "capture", "--dsn", pg_db.dsn, "--table", "missing"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "the table public.missing does not exist" in result.stderr
    assert "what to do:" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_safe_values() -> None:
    assert json_safe(Decimal("1.10")) == "1.10"
    assert json_safe(float("inf")) == "Infinity"
    assert json_safe(float("-inf")) == "-Infinity"
    assert json_safe(b"\x01\x02") == "0102"
    assert json_safe(timedelta(days=-1, seconds=5)) == "PT-23H-59M-55S"
    interval = pa.array(
        [pa.MonthDayNano([-14, 3, -1_500_000_000])], pa.month_day_nano_interval()
    ).to_pylist()[0]
    assert json_safe(interval) == "P-1Y-2M3DT-1.5S"
    assert json_safe([Decimal(1), None, {"a": b"\xff"}]) == ["1", None, {"a": "ff"}]
