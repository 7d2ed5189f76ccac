"""Helpers for the fintech demo tests: small populations, a fixed anchor, table dumps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from headrace.demo.config import HistorySettings, PopulationSettings, WorkloadSettings
from headrace.demo.schema import ALL_TABLES

ANCHOR = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
"""A fixed simulated-clock start, so runs are reproducible."""


def workload_settings(dsn: str, **overrides: Any) -> WorkloadSettings:
    """A small, fast workload: 400 customers, 200 transactions/s, no fraud unless asked."""
    values: dict[str, Any] = {
        "dsn": dsn,
        "seed": 7,
        "rate": 200.0,
        "fraud_every": 0,
        "anchor": ANCHOR,
        "population": PopulationSettings(customers=400, merchants=300),
    }
    values.update(overrides)
    return WorkloadSettings(**values)


def history_settings(dsn: str, **overrides: Any) -> HistorySettings:
    """A small history: 300 customers, one month."""
    values: dict[str, Any] = {
        "dsn": dsn,
        "seed": 11,
        "months": 1,
        "anchor": ANCHOR,
        "population": PopulationSettings(customers=300, merchants=300),
    }
    values.update(overrides)
    return HistorySettings(**values)


def dump_tables(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every demo table, in key order."""
    out: dict[str, list[tuple[object, ...]]] = {}
    with psycopg.connect(dsn) as conn:
        for table in ALL_TABLES:
            key = "scenario_id" if table == "fraud_ground_truth" else "id"
            query = sql.SQL("SELECT * FROM {} ORDER BY {}").format(
                sql.Identifier(table), sql.Identifier(key)
            )
            out[table] = conn.execute(query).fetchall()
    return out


def ledger_mismatches(dsn: str) -> list[tuple[object, ...]]:
    """Accounts whose balance is not the sum of their ledger, nor their last balance_after,
    or whose balance_after chain does not add up."""
    with psycopg.connect(dsn) as conn:
        bad = conn.execute(
            """
            SELECT a.id, a.balance, s.total, s.last_after
            FROM accounts a
            LEFT JOIN LATERAL (
                SELECT sum(delta) AS total,
                       (array_agg(balance_after ORDER BY id DESC))[1] AS last_after
                FROM ledger_entries l WHERE l.account_id = a.id
            ) s ON true
            WHERE a.balance IS DISTINCT FROM s.total OR a.balance IS DISTINCT FROM s.last_after
            """
        ).fetchall()
        chain = conn.execute(
            """
            SELECT id FROM (
                SELECT id, balance_after,
                       sum(delta) OVER (PARTITION BY account_id ORDER BY id) AS running
                FROM ledger_entries
            ) x WHERE balance_after <> running
            """
        ).fetchall()
    return bad + chain
