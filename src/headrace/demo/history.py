"""The history loader behind ``headrace demo load-history``: months of past data, fast.

Draws whole columns with numpy (seeded), renders them with Arrow and writes
them with COPY in one database transaction. The history ends at the anchor
(the wall clock unless given); every transaction in it is final (settled,
declined or reversed), and the ledger is complete: each account's balance is
the sum of its ledger deltas and the ``balance_after`` of its newest entry.
Normal traffic in the history keeps inside the same envelope as the live
generator, except that the per-account rate cap is a daily one
(``max_transactions_per_account_day``); it holds no fraud scenarios.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import psycopg
from psycopg import sql

from headrace.demo.bulk import cents_to_decimal, copy_table
from headrace.demo.clock import to_us
from headrace.demo.config import HistorySettings
from headrace.demo.history_draw import MONTH_DAYS, HistoryDraw
from headrace.demo.population import build_population, write_population
from headrace.demo.schema import (
    ALL_TABLES,
    apply_schema,
    bulk_load_mode,
    sync_id_sequences,
    truncate_tables,
)
from headrace.errors import ConfigError, SourceError


class Progress(Protocol):
    """Where the loader reports what it is doing (the CLI draws it with rich)."""

    def stage(self, name: str, total: int) -> None:
        """A new stage of ``total`` units begins."""

    def advance(self, units: int) -> None:
        """``units`` more of the current stage are done."""


class _Silent:
    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, units: int) -> None:
        pass


@dataclass
class HistoryReport:
    """What the loader wrote."""

    rows: dict[str, int] = field(default_factory=dict)  # per table
    start: datetime | None = None  # first instant of the history window
    anchor: datetime | None = None  # its end
    seconds: float = 0.0  # wall time taken


def load_history(settings: HistorySettings, progress: Progress | None = None) -> HistoryReport:
    """Write ``settings.months`` of history into an empty demo database.

    Applies the schema first. Refuses a database that already has demo rows
    unless ``settings.replace`` (which empties the demo tables).
    """
    if settings.months < 1:
        raise ConfigError(f"months must be at least 1, got {settings.months}", "pass --months 1")
    sink = progress or _Silent()
    began = time.monotonic()
    anchor = settings.anchor or datetime.now(UTC)
    if anchor.tzinfo is None:
        raise ConfigError("the anchor needs a time zone", "write it like 2026-01-01T00:00Z")
    window = timedelta(days=MONTH_DAYS * settings.months)
    try:
        conn = psycopg.connect(settings.dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise SourceError(
            f"cannot connect to the demo database: {exc}".strip(),
            "check --dsn (a libpq connection string) and that PostgreSQL is running",
        ) from exc
    with conn:
        apply_schema(conn)
        _ensure_empty(conn, replace=settings.replace)
        sink.stage("drawing customers, accounts, cards, merchants", 1)
        tables = build_population(settings.population, settings.seed, anchor, recent_window=window)
        sink.advance(1)
        draw = HistoryDraw(settings, tables, to_us(anchor - window), to_us(anchor))
        sink.stage("drawing transactions", 1)
        transactions = draw.transactions()
        sink.advance(1)
        sink.stage("drawing the ledger", 1)
        ledger, balances = draw.ledger()
        sink.advance(1)
        sink.stage("drawing logins", 1)
        logins = draw.logins()
        sink.advance(1)
        accounts = tables.accounts.set_column(
            tables.accounts.schema.get_field_index("balance"),
            "balance",
            cents_to_decimal(balances),
        )
        tables.accounts = accounts
        report = HistoryReport(start=anchor - window, anchor=anchor)
        total = sum(
            t.num_rows
            for t in (
                tables.customers,
                accounts,
                tables.cards,
                tables.merchants,
                transactions,
                ledger,
                logins,
            )
        )
        sink.stage("writing (COPY)", total)
        with conn.transaction(), bulk_load_mode(conn):
            write_population(conn, tables, on_rows=lambda name, n: _note(report, sink, name, n))
            for name, data in (
                ("transactions", transactions),
                ("ledger_entries", ledger),
                ("logins", logins),
            ):
                copy_table(conn, name, data, on_chunk=sink.advance)
                report.rows[name] = data.num_rows
            sink.stage("building indexes, checking foreign keys", 1)
        sink.advance(1)
        sync_id_sequences(conn)
        sink.stage("ANALYZE", 1)
        for table in ALL_TABLES:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
        sink.advance(1)
    report.seconds = time.monotonic() - began
    return report


def _note(report: HistoryReport, sink: Progress, name: str, rows: int) -> None:
    report.rows[name] = rows
    sink.advance(rows)


def _ensure_empty(conn: psycopg.Connection[tuple[object, ...]], *, replace: bool) -> None:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM customers)").fetchone()
    if row is None or not row[0]:
        return
    if not replace:
        raise ConfigError(
            "the demo tables already hold data; the history loader writes into empty tables",
            "pass --replace to empty them first, or use a fresh database",
        )
    truncate_tables(conn)
