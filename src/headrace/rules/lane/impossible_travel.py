"""Impossible travel / new country evaluated in memory, batch by batch, as the SQL rule does.

The rules lane gives every :class:`ChangeBatch` to :meth:`ImpossibleTravelLane.apply`, in
the order of the source; given the same batches as the engine it returns the alerts the
SQL rule (:mod:`headrace.rules.impossible_travel` +
:func:`headrace.alerts.store.emit_incidents`) writes for that batch.
``tests/rules/test_lane_impossible_travel.py`` checks the equality on real PostgreSQL
change streams. The semantics ported, per batch of the transactions table (every step is
the SQL rule's, named after its code):

- **Net change** (the engine's ``TableDelta``): per key its end row (none when deleted);
  an update changing the key deletes the old key. A truncate makes every row of the
  table before the batch a start row (``take_start_rows`` reads the whole mirror), so a key
  written again after a truncate is compared with its row from before the batch.
- **Watermark** (``RuleJob.advance``): ``W`` is the watermark *before* the batch;
  after it ``max(W, max(least(t, commit_ts)))`` over the batch's end rows (any row,
  card present or not; NULL ``t``: commit time).
- **Uses** (``RecentTransactions``, ``recent_rows(W - span)``): the card-present rows
  (``tables.transactions.card_present``, every status: a declined attempt still shows
  where the card was) with ``t >= W - span`` (``span`` = ``window`` + ``rules.lateness``)
  as of *after* the batch.
- **Countries** (``KeyedSums`` ``jobs.impossible_travel__countries``): per account and
  country the card-present rows of the table (end rows minus start rows, so a delete
  or an update out of the country takes its row away), read as of *before* the batch:
  the SQL rule updates it in its ``after`` hook, once every rule's candidates are taken.
  It needs every card-present row's (account, country), not only the recent ones: a
  delete sends only the key.
- **Triggers** (``tx_triggers`` + ``create_tx_triggers``): end rows that are card
  present whose start row is absent, was not card present, or had another account,
  country or event time, with ``t >= W - rules.lateness``.
- **Candidates** (``ImpossibleTravel.evaluate``): ``p`` = the account's use with the
  greatest ``t`` strictly before the trigger's (``ASOF LEFT JOIN``). ``km`` (haversine
  of the two countries' configured centres, in DuckDB's operation order) when ``p`` is
  less than ``window`` before, in another country, both located; ``seconds`` = the two
  ``epoch()`` values' difference whenever ``p`` exists; ``speed_kmh = km /
  max(seconds, 1) * 3600``; *impossible* when it exceeds ``max_speed_kmh``. *New
  country*: ``new_country`` configured, the trigger's country not among the account's
  countries before the batch, and at least ``min_history`` card-present rows of the
  account before the batch. Either makes a candidate. The trigger prefilter (an earlier
  use within the window in another country, or the new-country test) is implied by this
  condition and so is not computed.
- **Incidents** (dedup key ``impossible_travel:<account>``): :class:`Incidents`;
  ``started_at`` is ``p``'s time for impossible travel, else the trigger's.
- **Payload**: numbers (``km`` and ``speed_kmh`` rounded to 0.1, ``seconds``, the
  limit, both flags, the known countries sorted, ``history``), the trigger's key and
  the evidence ``[p, trigger]`` (``[trigger]`` without ``p``). DuckDB 2's ``round`` of
  a double rounds its exact decimal value half away from zero (:func:`duck_round`), its
  ``epoch()`` of a TIMESTAMPTZ is milliseconds / 1000 plus the rest (:func:`epoch`),
  and ``format('{}', double)`` prints Python's ``repr``: all three are copied exactly.

SQL behaviour the lane copies although it looks wrong (see the lane port report):

- **Unsure previous use on ties** (the one place the lane is *not* equal): when several
  uses of the account share the greatest time before the trigger, DuckDB's ASOF join
  takes one of them by the physical order of ``jobs.rules__recent`` (not a column):
  with DE and US uses at the same time, a US use a minute later alerts when the DE row
  was written first and not when the US row was. The lane takes the greatest key; the
  equality tests avoid such ties.
- **An out-of-order use is never paired with the use after it**: only triggers look
  back, and a row arriving late (within ``rules.lateness``) does not re-trigger the
  account's later uses. FR at 0 s, DE at 120 s, then FR at 60 s (max 30,000 km/h): no
  alert, while in time order the DE use alerts (FR → DE in 60 s). The lane does the
  same.
- **NULL summary** (``min_history: 0``): a new-country candidate of an account without
  any card-present row before the batch has no known countries, and
  ``format(..., known)`` with a NULL argument is NULL: the alert has no summary. The
  lane gives ``None`` too.

Not ported: NULL account, country or event time (the reference schema forbids them; the
SQL rule's countries table cannot even hold a NULL country: its key is the primary key);
unchanged TOAST values (the rule's columns are never TOASTed).
Per changed row of the transactions table the work is Python: dict updates, a
``bisect`` insort into the account's sorted uses; per trigger one bisect and a dict
lookup; for a candidate a few float operations, a sort of the account's known countries
and two evidence rows. Memory: the uses (the span's card-present rows with their
evidence fields) and (account, country, time) of *every* card-present row of the table,
which the countries need as long as deletes and updates come without their old row.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, cast

import duckdb

from headrace.rules.base import EARLIEST, EVIDENCE_LIMIT
from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import Incidents, LaneAlert, from_us, to_us, us_delta
from headrace.rules.lane.changes import first_column, key_columns, net_change
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.duck_numbers import duck_round
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.tx_rule import advance, seeded_watermark, time_sql, tx_columns, tx_wanted
from headrace.rules.lane.window import AccountWindows, BatchFields, Fields, entry_time
from headrace.rules.triggers import TX_FIELDS
from headrace.source.changes import ChangeBatch, TableRef
from headrace.store.duckdb.schema import mirror_table

RULE = "impossible_travel"
PRESENT = "_lane_card_present"
"""Name of the ``card_present`` condition among a net change's values."""

_EXTRA = tuple(name for name in TX_FIELDS if name not in ("account", "t", "country"))
"""The evidence fields kept beside (account, t, country)."""


def epoch(us: int) -> float:
    """DuckDB's ``epoch(TIMESTAMPTZ)`` (ICU: whole milliseconds / 1000, then the rest),
    which is not always ``us / 1e6`` (one unit in the last place apart)."""
    return float(us // 1000) / 1000.0 + (us % 1000) / 1e6


_Row = tuple[int, int | None, str | None]
"""What decides a trigger and the countries: a card-present row's ``(account, t,
country)`` (event time in µs; NULL possible in a schema allowing it: then it is no use). Plain
tuples, not NamedTuples: CPython stops tracking an exact tuple of atomic values in the
garbage collector, and :attr:`ImpossibleTravelLane.present` holds every card-present row
(a NamedTuple each was traversed by every full collection, every thread stopped)."""
_Use = tuple[int, int, str | None]
"""A use: a :data:`_Row` with an event time (a row of the uses' window)."""


def _use(row: _Row | None) -> _Use | None:
    """The row as a use (None: no row, or no event time)."""
    if row is None or row[1] is None:
        return None
    return cast(_Use, row)


@dataclass
class ImpossibleTravelLane(AccountWindows[_Use]):
    """The impossible-travel rule over change batches, in memory (module docstring); its
    window (:class:`AccountWindows`) holds the uses: card present, within the span."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None
    present: dict[Hashable, _Row] = field(default_factory=dict)
    """Every card-present row of the table (the countries' start rows, the triggers')."""
    countries: dict[int, dict[str | None, int]] = field(default_factory=dict)
    """Per account, its card-present rows per country (only counts above zero)."""

    def __post_init__(self) -> None:
        travel = self.rules.impossible_travel
        if travel is None:
            raise ValueError("the impossible travel lane needs rules.impossible_travel")
        self.config = travel
        tx = self.rules.tables.transactions
        self.ref = TableRef.parse(tx.table)
        self.columns = tx_columns(tx)
        self.card_present = arrow_condition(tx.card_present)
        self.window_us = us_delta(travel.window)
        self.span_us = us_delta(travel.window + self.rules.lateness)
        self.lateness_us = us_delta(self.rules.lateness)
        self.earliest_us = to_us(EARLIEST)
        self.incidents = Incidents(us_delta(travel.rearm_after))
        self.wanted = tx_wanted(self.columns)

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.ref,)

    # ----------------------------------------------------------- seeding

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirror, as a snapshot rebuild does: the watermark is the
        mirror's newest ``least(t, now())``, the countries every card-present row's, the
        uses those within the span, the incidents' last-seen times the store's. ``saved``
        (the lane's own record) gives the watermark and incidents instead."""
        mirror = mirror_table(self.ref)
        t = time_sql(self.columns["t"])
        self.watermark_us = seeded_watermark(con, self.ref, self.columns["t"], saved)
        self.present.clear()
        self.countries.clear()
        self._clear()
        key = key_columns(con, self.ref)
        width = len(key)
        names = ", ".join(f'"{k}"' for k in key)
        values = ", ".join(f'"{self.columns[name]}"' for name in _EXTRA)
        cursor = con.execute(
            f"""SELECT {names}, "{self.columns["account"]}"::BIGINT, "{self.columns["country"]}",
                       epoch_us({t}), {values} FROM {mirror}
                WHERE coalesce(({self.rules.tables.transactions.card_present}), false)
                  AND "{self.columns["account"]}" IS NOT NULL"""
        )
        horizon = None if self.watermark_us is None else self.watermark_us - self.span_us
        found = cursor.fetchall()
        for row in found:
            k: Hashable = row[0] if width == 1 else tuple(row[:width])
            account, country, at = row[width : width + 3]
            present = (int(account), None if at is None else int(at), country)
            self._count(k, present)
            use = _use(present)
            if horizon is not None and use is not None and use[1] >= horizon:
                self._add(k, use, tuple(row[width + 3 :]))
        self.incidents.restore(con, RULE, saved)

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark and the incidents changed."""
        return RuleSaved(self.watermark_us, self.incidents.take_touched())

    # ----------------------------------------------------------- state

    def _count(self, key: Hashable, row: _Row) -> None:
        self.present[key] = row
        account, _, country = row
        seen = self.countries.setdefault(account, {})
        seen[country] = seen.get(country, 0) + 1

    def _uncount(self, key: Hashable) -> None:
        row = self.present.pop(key, None)
        if row is None:
            return
        account, _, country = row
        seen = self.countries[account]
        seen[country] -= 1
        if not seen[country]:
            del seen[country]
            if not seen:
                del self.countries[account]

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        change = net_change(
            batch, self.ref, self.wanted, {PRESENT: self.card_present}, mark=self.columns["t"]
        )
        if change is None:
            return []
        previous, self.watermark_us = advance(self.watermark_us, self.earliest_us, change)
        # Triggers compare with the start rows: the card-present rows before the batch
        # (on a truncate too: the engine's start rows are then the whole table).
        cutoff = previous - self.lateness_us
        columns = change.columns
        present, accounts = columns[PRESENT], columns[self.columns["account"]]
        countries, times = columns[self.columns["country"]], columns[self.columns["t"]]
        fields = BatchFields([columns[self.columns[name]] for name in _EXTRA])
        triggers: list[tuple[Hashable, _Use, int]] = []
        ends: list[tuple[Hashable, _Row | None, int]] = []
        uses: list[tuple[Hashable, _Use | None, int]] = []
        held = self.present.get
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            # the end row: None when deleted, not card present, or without an account
            row = None
            if alive and present[i]:
                account = accounts[i]
                if account is not None:
                    country = countries[i]
                    row = (account, times[i], None if country is None else str(country))
            ends.append((key, row, i))
            use = _use(row)
            uses.append((key, use, i))
            if use is not None and use[1] >= cutoff and held(key) != row:
                triggers.append((key, use, i))
        # The uses are read as of after the batch (RecentTransactions.update runs first).
        if change.truncated:
            self._clear()
        self._update(uses, fields, previous - self.span_us)
        found = [
            self._candidate(key, use, change.commits[i], change.lsns[i], fields[i])
            for key, use, i in triggers
        ]
        opened = self.incidents.open([c for c in found if c is not None])
        # The countries are read as of before the batch (the rule's ``after`` hook).
        if change.truncated:
            self.present.clear()
            self.countries.clear()
        for key, row, _ in ends:
            self._uncount(key)
            if row is not None:
                self._count(key, row)
        return opened

    def _candidate(
        self, key: Hashable, use: _Use, commit_us: int, lsn: int, extra: Fields
    ) -> LaneAlert | None:
        config = self.config
        account, at, country = use
        entries = self.by_account.get(account, [])
        # ASOF: the greatest time strictly before the trigger's (ties: the greatest key)
        below = bisect.bisect_left(entries, at, key=entry_time)
        p_key = entries[below - 1][1] if below else None
        p = None if p_key is None else self.rows[p_key]
        p_at, p_country = (0, None) if p is None else (p[1], p[2])
        km: float | None = None
        seconds: float | None = None
        speed: float | None = None
        if p is not None:
            seconds = epoch(at) - epoch(p_at)
            if p_at > at - self.window_us and p_country != country:
                km = self._km(p_country, country)
            if km is not None:
                speed = km / max(seconds, 1.0) * 3600
        impossible = speed is not None and speed > config.max_speed_kmh
        counts = self.countries.get(account)
        history = sum(counts.values()) if counts else 0
        unseen = not counts or country not in counts
        new_country = config.new_country and unseen and history >= config.min_history
        if not (impossible or new_country):
            return None
        known = sorted(counts, key=_order) if counts else None
        summary: str | None = None  # format() with a NULL argument (module docstring)
        if impossible and p is not None:
            summary = (
                f"card present in {p_country} then {country} "
                f"{_number(seconds)} s later: {_number(km)} km, "
                f"{_number(speed)} km/h (account {account})"
            )
        elif known is not None:
            summary = (
                f"card present in {country}, a country new for account {account} "
                f"(known: [{', '.join(_text(c) for c in known)}])"
            )
        evidence = [self._evidence(key, use, extra)]
        if p is not None and p_key is not None:
            evidence.insert(0, self._evidence(p_key, p, self.fields[p_key]))
        return LaneAlert(
            rule=RULE,
            account=account,
            key=f"{RULE}:{account}",
            trigger=first_column(key),
            event_us=at,
            started_us=p_at if impossible and p is not None else at,
            commit_us=commit_us,
            lsn=lsn,
            severity=config.severity.value,
            summary=summary,  # NULL as the SQL alert's can be (module docstring)
            numbers={
                "km": None if km is None else duck_round(km, 1),
                "seconds": seconds,
                "speed_kmh": None if speed is None else duck_round(speed, 1),
                "max_speed_kmh": config.max_speed_kmh,
                "impossible_travel": impossible,
                "new_country": new_country,
                # a JSON list in the SQL payload; LaneAlert's numbers type has no lists
                "known_countries": known,
                "history": history,
            },
            evidence=evidence[:EVIDENCE_LIMIT],
        )

    def _km(self, previous: str | None, country: str | None) -> float | None:
        """The SQL rule's haversine, operation for operation (so the doubles are equal)."""
        locations = self.config.locations
        if previous is None or country is None:
            return None
        start, to = locations.get(previous), locations.get(country)
        if start is None or to is None:
            return None
        (p_lat, p_lon), (t_lat, t_lon) = start, to
        r = math.radians
        a = math.pow(math.sin(r(t_lat - p_lat) / 2), 2) + math.cos(r(p_lat)) * math.cos(
            r(t_lat)
        ) * math.pow(math.sin(r(t_lon - p_lon) / 2), 2)
        return 2 * 6371.0 * math.asin(math.sqrt(a))

    def _evidence(self, key: Hashable, use: _Use, extra: Fields) -> dict[str, Any]:
        return {
            "id": first_column(key),
            "at": from_us(use[1]),
            "account": use[0],
            "country": use[2],
            **dict(zip(_EXTRA, extra, strict=True)),
        }


def _number(value: float | None) -> str:
    """``format('{}', round(value))`` of a double (Python's repr is fmt's shortest form)."""
    return "NULL" if value is None else repr(duck_round(value))


def _order(country: str | None) -> tuple[bool, str]:
    """DuckDB's ``ORDER BY country``: code-point order, NULL last."""
    return (country is None, country or "")


def _text(country: str | None) -> str:
    """A country as DuckDB's ``format`` prints it in a list."""
    return "NULL" if country is None else country
