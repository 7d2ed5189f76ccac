"""Handing the alerts a writer transaction inserts to the delivery threads, without a query.

The outbox (``headrace.alert_deliveries``) is the durable truth of what must
be sent; reading it back after every commit costs a query on a reader cursor
competing with the writer for the same cores (tens of milliseconds under
load). So when the rows are inserted, :func:`~headrace.alerts.store.insert_alerts`
also *offers* them (as ``INSERT ... RETURNING`` gives them back, no extra
statement) to whoever *watches* that writer connection: the
:class:`~headrace.alerts.delivery.AlertDelivery` of the store. The watcher
holds them until the store publishes the commit, and sends them then.

An offer is only a hint: the transaction may still roll back. The watcher
forgets its held offers whenever a transaction of the store failed, and falls
back to the outbox (see the delivery module). Nothing is collected for a
connection nobody watches (tests, tools, a pipeline without sinks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb


@dataclass(frozen=True)
class NewAlerts:
    """The rows one ``insert_alerts`` call wrote, as DuckDB returned them."""

    alerts: list[tuple[Any, ...]]
    """Rows of ``headrace.alerts`` in :data:`~headrace.alerts.store.ALERT_COLUMNS` order."""
    deliveries: list[tuple[Any, ...]]
    """Outbox rows ``(alert_id, sink, idempotency_key)``, all ``pending`` with no attempt."""


Watcher = Callable[[NewAlerts], None]

_watchers: dict[int, Watcher] = {}
_lock = threading.Lock()


def watch(con: duckdb.DuckDBPyConnection, watcher: Watcher) -> Callable[[], None]:
    """Call ``watcher`` (in the writer's thread, inside its transaction) with every
    :class:`NewAlerts` written through ``con``; returns the function that stops it.
    One watcher per connection: a second one replaces the first.
    """
    key = id(con)
    with _lock:
        _watchers[key] = watcher

    def unwatch() -> None:
        with _lock:
            if _watchers.get(key) is watcher:
                del _watchers[key]

    return unwatch


def watching(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether anyone takes the alerts written through ``con`` (else none are collected)."""
    return id(con) in _watchers


def offer(con: duckdb.DuckDBPyConnection, new: NewAlerts) -> None:
    """Hand ``new`` to the watcher of ``con``, if any."""
    with _lock:
        watcher = _watchers.get(id(con))
    if watcher is not None:
        watcher(new)
