"""Tile results shared by the views of one store snapshot: one query, same rows, masks apart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from headrace.serve.shared_tiles import SharedTiles, SnapshotKey, TileKey
from tests.serve.conftest import Served
from tests.serve.test_live import metric

KEY: TileKey = ("SELECT 1", (), "")
SNAPSHOT: SnapshotKey = (3, 100, datetime(2026, 11, 29, tzinfo=UTC))
NEXT: SnapshotKey = (4, 101, datetime(2026, 11, 29, 0, 0, 1, tzinfo=UTC))
ROWS = '"columns":[{"name":"x","type":"INTEGER"}],"rows":[[1]],"truncated":false'


def _claimed_with_a_waiter() -> tuple[SharedTiles, threading.Thread, list[tuple[Any, bool]]]:
    """Tiles whose KEY one caller claimed on SNAPSHOT, and a thread that then takes it
    too (what it got lands in the list)."""
    shared = SharedTiles(keep_s=60)
    assert shared.take(KEY, SNAPSHOT, 1.0) == (None, True)
    got: list[tuple[Any, bool]] = []
    waiter = threading.Thread(target=lambda: got.append(shared.take(KEY, SNAPSHOT, 5.0)))
    waiter.start()
    return shared, waiter, got


def test_the_first_taker_computes_and_the_others_get_its_result() -> None:
    shared, waiter, got = _claimed_with_a_waiter()
    time.sleep(0.1)
    assert not got  # waits for the running query instead of running it too
    shared.finish(KEY, SNAPSHOT, ROWS)
    waiter.join(5)
    assert got == [(ROWS, False)]
    assert shared.take(KEY, SNAPSHOT, 1.0) == (ROWS, False)
    # Another snapshot is not served the old result; it is computed (and claimed) anew.
    assert shared.take(KEY, NEXT, 1.0) == (None, True)


def test_a_failed_query_is_not_shared_and_its_waiters_run_it_themselves() -> None:
    shared, waiter, got = _claimed_with_a_waiter()
    time.sleep(0.05)
    shared.finish(KEY, SNAPSHOT, None)
    waiter.join(5)
    assert got == [(None, True)]  # the waiter claims it and runs it


def test_a_query_running_on_another_snapshot_is_not_waited_for() -> None:
    shared = SharedTiles(keep_s=60)
    assert shared.take(KEY, SNAPSHOT, 1.0) == (None, True)
    started = time.monotonic()
    assert shared.take(KEY, NEXT, 5.0) == (None, False)
    assert time.monotonic() - started < 1.0
    # A late result of an older snapshot never replaces a newer one.
    shared.finish(KEY, NEXT, ROWS)
    shared.finish(KEY, SNAPSHOT, ROWS.replace("[[1]]", "[[0]]"))
    assert shared.take(KEY, NEXT, 1.0) == (ROWS, False)


def _data(served: Served, role: str, query: str) -> dict[str, Any]:
    reply = served.client(role).get(f"/api/dashboards/payments/data?{query}")
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def _tile(data: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in data["tiles"] if t["name"] == name)
    return found


def _settled(served: Served, until: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not until():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_views_of_one_snapshot_share_the_tiles_their_filters_do_not_change(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    served.writer.write(3)  # a version the server saw arrive: the views share their bounds
    _settled(
        served,
        lambda: metric(served, "headrace_store_version") >= served.store.version,
    )
    reuses = metric(served, "headrace_serve_tile_reuses_total")
    plain = _data(served, "admin", "range=1h")
    filtered = _data(served, "admin", "range=1h&f.currency=EUR")
    assert plain["version"] == filtered["version"]
    assert plain["as_of"] == filtered["as_of"]
    assert plain["range"] == filtered["range"]
    # The alerts tile takes no filter: the filtered view takes the plain view's result.
    alerts = _tile(filtered, "alerts")
    assert alerts.get("shared") is True
    assert alerts["rows"] == _tile(plain, "alerts")["rows"]
    assert "shared" not in _tile(filtered, "tx_count")  # filtered: its own query
    assert metric(served, "headrace_serve_tile_reuses_total") - reuses == 1
    # Another role's masks make other queries: nothing is shared across them.
    viewer = _data(served, "viewer", "range=1h")
    assert not any(t.get("shared") for t in viewer["tiles"])
    recent = _tile(viewer, "recent")
    card = [c["name"] for c in recent["columns"]].index("card_number")
    assert recent["rows"]
    assert all(row[card] == "****" for row in recent["rows"])
    admin_recent = _tile(plain, "recent")
    assert all(row[card] != "****" for row in admin_recent["rows"])
