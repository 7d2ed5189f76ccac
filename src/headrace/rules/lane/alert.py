"""What the rules lane's evaluators share: times in microseconds, alerts, incidents.

An evaluator of the lane (:mod:`headrace.rules.lane.velocity`, ...) turns change
batches into :class:`LaneAlert` values, the same alerts its SQL rule writes for
the same batches. :class:`Incidents` is the SQL rules' "one alert per incident"
(:func:`headrace.alerts.store.emit_incidents`) over one rule's candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import duckdb

from headrace.alerts.store import INCIDENTS
from headrace.rules.lane.saved import RuleSaved
from headrace.store.duckdb.schema import table_exists

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime) -> int:
    """Microseconds since the epoch (exact: no float on the way)."""
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    """The inverse of :func:`to_us` (UTC)."""
    return _EPOCH + timedelta(microseconds=value)


def us_delta(value: timedelta) -> int:
    """A duration in whole microseconds."""
    return value // timedelta(microseconds=1)


Number = int | float | Decimal


@dataclass(frozen=True)
class LaneAlert:
    """One opened incident, with what the SQL rule's alert row holds.

    Times are µs since the epoch; ``numbers``, ``trigger`` and ``evidence`` are the
    alert payload's (``{"numbers": ..., "trigger": ..., "evidence": [...]}``).
    """

    rule: str
    account: int | None
    key: str
    """The dedup key (``<rule>:<account>`` for the per-account rules)."""
    trigger: Hashable
    """The trigger row's key (its id for a one-column key)."""
    event_us: int
    started_us: int | None
    commit_us: int
    lsn: int
    severity: str
    summary: str | None
    """One readable line (NULL when the SQL rule's format() got a NULL argument)."""
    numbers: Mapping[str, Number | str | list[str | None] | None]
    evidence: Sequence[Mapping[str, Any]] = ()
    tied: tuple[Hashable, ...] = ()
    """Other candidates of the same key, event time and commit LSN: the SQL rules order
    candidates by (event time, LSN) only, so the SQL alert may name any of them."""

    def payload(self) -> dict[str, Any]:
        """The payload as the SQL rule writes it (``numbers``, ``trigger``, ``evidence``)."""
        return {
            "numbers": dict(self.numbers),
            "trigger": self.trigger,
            "evidence": list(self.evidence),
        }


class Candidate(NamedTuple):
    """A candidate whose alert is made only if it opens an incident.

    Whether a candidate opens depends only on these fields; its alert (numbers,
    evidence) may cost time proportional to the rule's window, and an account that
    stays over a limit is a candidate on every transaction while its incident is
    open. ``build`` must give the alert with these same fields, from the state as it
    is when :meth:`Incidents.open` runs.
    """

    key: str
    event_us: int
    lsn: int
    trigger: Hashable
    build: Callable[[], LaneAlert]


@dataclass
class Incidents:
    """One rule's incidents: the newest candidate time per dedup key, and the re-arm rule.

    Per batch the candidates of a key are taken in ``(event time, LSN)`` order (then the
    trigger key, so ties are deterministic): the first opens an incident (an alert) when
    the key has no incident or its event time is more than ``rearm_us`` after the stored
    last-seen time; a later one when it is more than ``rearm_us`` after
    ``max(previous candidate, stored last-seen)``. Then last-seen becomes the newest
    candidate time. This is :func:`headrace.alerts.store.emit_incidents`.
    """

    rearm_us: int
    last_seen: dict[str, int] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    """Keys whose last-seen time changed since :meth:`take_touched`."""

    def open(self, candidates: Sequence[LaneAlert | Candidate]) -> list[LaneAlert]:
        """The candidates that open incidents, as alerts (in event order); records every
        candidate."""
        found = sorted(candidates, key=lambda c: (c.key, c.event_us, c.lsn, str(c.trigger)))
        opened: list[LaneAlert] = []
        previous: LaneAlert | Candidate | None = None
        stored: int | None = None
        for candidate in found:
            if previous is None or previous.key != candidate.key:
                stored = self.last_seen.get(candidate.key)
                opens = stored is None or candidate.event_us > stored + self.rearm_us
            else:
                newest = previous.event_us if stored is None else max(previous.event_us, stored)
                opens = candidate.event_us > newest + self.rearm_us
            if opens:
                tied = tuple(
                    c.trigger
                    for c in found
                    if (c.key, c.event_us, c.lsn)
                    == (candidate.key, candidate.event_us, candidate.lsn)
                    and c.trigger != candidate.trigger
                )
                alert = candidate.build() if isinstance(candidate, Candidate) else candidate
                opened.append(replace(alert, tied=tied))
            self.touched.add(candidate.key)
            seen = self.last_seen.get(candidate.key)
            self.last_seen[candidate.key] = (
                candidate.event_us if seen is None else max(seen, candidate.event_us)
            )
            previous = candidate
        opened.sort(key=lambda c: (c.event_us, c.lsn, c.key))
        return opened

    def restore(self, con: duckdb.DuckDBPyConnection, rule: str, saved: RuleSaved | None) -> None:
        """Start from the lane's record of the rule, else from the store's incidents (the
        rule ran as SQL before, or nothing: a snapshot)."""
        self.last_seen.clear()
        self.touched.clear()
        if saved is not None:
            self.last_seen.update(saved.last_seen)
            return
        schema, name = INCIDENTS.split(".")
        if not table_exists(con, schema, name):
            return
        for key, seen in con.execute(
            f"SELECT key, last_seen_at FROM {INCIDENTS} WHERE rule = ?", [rule]
        ).fetchall():
            if seen is not None:
                self.last_seen[str(key)] = to_us(seen)

    def take_touched(self) -> dict[str, int]:
        """The last-seen times changed since the last call (to be saved)."""
        out = {key: self.last_seen[key] for key in self.touched}
        self.touched.clear()
        return out
