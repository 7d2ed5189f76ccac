"""The read watchdog: one thread interrupts real DuckDB queries past their deadline."""

from __future__ import annotations

import time

import duckdb
import pytest

from headrace.serve.watchdog import Watchdog

_SLOW = "SELECT count(*) FROM range(100000000000) a WHERE a.range % 7 = 3"


def test_a_query_past_its_deadline_is_interrupted() -> None:
    watchdog = Watchdog()
    con = duckdb.connect()
    try:
        started = time.monotonic()
        with pytest.raises(duckdb.InterruptException), watchdog.guard(con, 0.2):
            con.sql(_SLOW).fetchall()
        assert time.monotonic() - started < 5
        assert watchdog.fired == 1
        # The cursor is usable afterwards and a guarded fast query is left alone.
        with watchdog.guard(con, 0.2):
            assert con.sql("SELECT 42").fetchall() == [(42,)]
        time.sleep(0.3)
        assert con.sql("SELECT 1").fetchall() == [(1,)]
        assert watchdog.fired == 1
    finally:
        watchdog.close()
        con.close()


def test_a_later_shorter_deadline_wakes_the_watchdog() -> None:
    watchdog = Watchdog()
    slow, fast = duckdb.connect(), duckdb.connect()
    try:
        with watchdog.guard(slow, 60.0):
            started = time.monotonic()
            with pytest.raises(duckdb.InterruptException), watchdog.guard(fast, 0.2):
                fast.sql(_SLOW).fetchall()
            assert time.monotonic() - started < 5
    finally:
        watchdog.close()
        slow.close()
        fast.close()
