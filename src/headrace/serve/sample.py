"""A small fintech-shaped store that follows docs/store.md, and a dashboard for it.

Used by the serving tests and by ``headrace serve --sample`` to look at the UI
(``headrace bench serve`` drives the real fintech deployment through
PostgreSQL instead). It writes
through the engine's :class:`DuckDBStore`: one batch per call — mirror rows,
history, an incrementally maintained rollup state table, position and
per-table freshness in one transaction, the way the engine does — then
publishes the commit (version bump + listeners).
"""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from headrace.scores.health import SCORES_DDL
from headrace.serve.tiles import ChartType, Dashboard, Dimension, Drill, Tile
from headrace.store.duckdb.store import DuckDBStore

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "merchant_category": ("grocery", "travel", "electronics", "fuel", "restaurants"),
    "merchant_country": ("DE", "FR", "GB", "US", "NL"),
    "channel": ("card_present", "online", "atm", "transfer"),
    "currency": ("EUR", "USD", "GBP"),
    "account_tier": ("basic", "plus", "premium"),
    "tx_type": ("purchase", "refund", "withdrawal", "transfer"),
    "status": ("pending", "settled", "declined", "reversed"),
}

_DDL = """
CREATE TABLE IF NOT EXISTS headrace.alerts (
    id BIGINT PRIMARY KEY, rule TEXT, severity TEXT, account_id BIGINT, key TEXT,
    started_at TIMESTAMPTZ, detected_at TIMESTAMPTZ, payload JSON);
CREATE TABLE IF NOT EXISTS mirror.accounts (
    id BIGINT PRIMARY KEY, customer_id BIGINT, tier TEXT, status TEXT,
    balance DECIMAL(18,2), opened_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS mirror.transactions (
    id BIGINT PRIMARY KEY, account_id BIGINT, card_number TEXT, merchant_category TEXT,
    merchant_country TEXT, channel TEXT, currency TEXT, account_tier TEXT, tx_type TEXT,
    status TEXT, amount DECIMAL(18,2), ip TEXT, created_at TIMESTAMPTZ, _hr_lsn UBIGINT);
CREATE TABLE IF NOT EXISTS history.transactions (
    _hr_lsn UBIGINT, _hr_commit_ts TIMESTAMPTZ, _hr_xid BIGINT, _hr_seq BIGINT, _hr_op TEXT,
    id BIGINT, account_id BIGINT, card_number TEXT, merchant_category TEXT,
    merchant_country TEXT, channel TEXT, currency TEXT, account_tier TEXT, tx_type TEXT,
    status TEXT, amount DECIMAL(18,2), ip TEXT, created_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS rollup.tx_volume__state (
    bucket TIMESTAMPTZ, merchant_category TEXT, merchant_country TEXT, channel TEXT,
    currency TEXT, account_tier TEXT, tx_type TEXT, status TEXT,
    tx_count BIGINT, volume DECIMAL(38,2), max_amount DECIMAL(18,2),
    PRIMARY KEY (bucket, merchant_category, merchant_country, channel, currency,
                 account_tier, tx_type, status));
CREATE OR REPLACE VIEW rollup.tx_volume_5m AS
    SELECT bucket, merchant_category, merchant_country, channel, currency, account_tier,
           tx_type, status, tx_count, volume, max_amount,
           CAST(volume / tx_count AS DECIMAL(18,2)) AS avg_amount
    FROM rollup.tx_volume__state;
INSERT OR IGNORE INTO headrace.rollups (name, table_name, state, reason, definition, updated_at,
    views) VALUES ('tx_volume', 'public.transactions', 'active', NULL, '{}', now(),
    '["rollup.tx_volume_5m"]');
"""

_TX_COLUMNS = (
    "id", "account_id", "card_number", "merchant_category", "merchant_country", "channel",
    "currency", "account_tier", "tx_type", "status", "amount", "ip", "created_at",
)  # fmt: skip

_DIMS = ", ".join(DIMENSIONS)


def create_sample_store(store: DuckDBStore, accounts: int = 50) -> None:
    """Create the sample tables and a few accounts in a store (idempotent)."""
    with store.transaction() as con:
        _fill(con, accounts)


def _fill(con: duckdb.DuckDBPyConnection, accounts: int) -> None:
    con.execute(_DDL)
    for ddl in SCORES_DDL:  # the health scores and their history, as the engine has them
        con.execute(ddl)
    rng = random.Random(7)  # noqa: S311 - synthetic data, not security
    now = datetime.now(UTC)
    rows = [
        (
            i,
            1000 + i,
            rng.choice(DIMENSIONS["account_tier"]),
            "active",
            Decimal(rng.randint(0, 100_000)) / 100,
            now - timedelta(days=rng.randint(1, 900)),
        )
        for i in range(1, accounts + 1)
    ]
    con.executemany("INSERT OR IGNORE INTO mirror.accounts VALUES (?, ?, ?, ?, ?, ?)", rows)


class SampleWriter:
    """Commits batches of synthetic transactions, as the engine would."""

    def __init__(self, store: DuckDBStore, *, seed: int = 1, accounts: int = 50) -> None:
        self.store = store
        self._con = store.writer
        self._rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
        self._accounts = accounts
        row = self._con.execute(
            "SELECT coalesce(max(id), 0), coalesce(max(_hr_lsn), 0) FROM mirror.transactions"
        ).fetchall()[0]
        self.next_id = int(row[0]) + 1
        self.lsn = int(row[1])
        alert_row = self._con.execute(
            "SELECT coalesce(max(id), 0) FROM headrace.alerts"
        ).fetchall()[0]
        self.next_alert = int(alert_row[0]) + 1
        self._lock = threading.Lock()

    def _row(self, created_at: datetime, **fixed: Any) -> dict[str, Any]:
        rng = self._rng
        row: dict[str, Any] = {
            "id": self.next_id,
            "account_id": rng.randint(1, self._accounts),
            "card_number": f"4111{rng.randint(0, 10**12 - 1):012d}",
            "amount": Decimal(rng.randint(100, 500_000)) / 100,
            "ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "created_at": created_at,
        }
        for dim, values in DIMENSIONS.items():
            row[dim] = rng.choice(values)
        row.update(fixed)
        self.next_id += 1
        return row

    def write(
        self,
        count: int,
        *,
        at: datetime | None = None,
        alert: bool = False,
        **fixed: Any,
    ) -> list[dict[str, Any]]:
        """Commit one batch of ``count`` transactions (optionally one alert); returns the rows."""
        with self._lock:
            commit_ts = datetime.now(UTC)
            created = at or commit_ts
            rows = [self._row(created, **fixed) for _ in range(count)]
            self.lsn += 1000
            data = pa.table(
                {
                    **{c: [r[c] for r in rows] for c in _TX_COLUMNS},
                    "_hr_lsn": pa.array([self.lsn] * count, pa.uint64()),
                }
            )
            con = self._con
            con.register("_hr_batch", data)
            try:
                with self.store.transaction():
                    self._apply(con, rows, commit_ts, alert)
            finally:
                con.unregister("_hr_batch")
        self.store.publish(self.lsn, commit_ts, ["public.transactions"], count)
        return rows

    def _apply(
        self,
        con: duckdb.DuckDBPyConnection,
        rows: list[dict[str, Any]],
        commit_ts: datetime,
        alert: bool,
    ) -> None:
        cols = ", ".join(_TX_COLUMNS)
        con.execute(f"INSERT INTO mirror.transactions SELECT {cols}, _hr_lsn FROM _hr_batch")
        con.execute(
            "INSERT INTO history.transactions SELECT _hr_lsn, $ts, 1, "
            f"row_number() OVER (), 'I', {cols} FROM _hr_batch",
            {"ts": commit_ts},
        )
        con.execute(
            "INSERT INTO rollup.tx_volume__state SELECT "
            f"time_bucket(INTERVAL 5 MINUTE, created_at) AS bucket, {_DIMS}, "
            "count(*), sum(amount), max(amount) FROM _hr_batch GROUP BY ALL "
            "ON CONFLICT DO UPDATE SET tx_count = tx_count + excluded.tx_count, "
            "volume = volume + excluded.volume, "
            "max_amount = greatest(max_amount, excluded.max_amount)"
        )
        if alert:
            con.execute(
                "INSERT INTO headrace.alerts VALUES ($id, 'velocity_burst', 'high', "
                "$account, $key, $ts, $ts, $payload)",
                {
                    "id": self.next_alert,
                    "account": rows[0]["account_id"],
                    "key": f"acct-{rows[0]['account_id']}",
                    "ts": commit_ts,
                    "payload": json.dumps({"count": len(rows)}),
                },
            )
            self.next_alert += 1
        DuckDBStore.write_position(con, "postgres", self.lsn, commit_ts)
        con.execute(
            "INSERT INTO headrace.tables (table_name, mirror_table, rows, last_commit_ts, "
            "last_lsn, applied_at, schema_version) SELECT 'public.transactions', "
            "'mirror.transactions', (SELECT count(*) FROM mirror.transactions), $ts, $lsn, "
            "now(), 1 ON CONFLICT (table_name) DO UPDATE SET rows = excluded.rows, "
            "last_commit_ts = excluded.last_commit_ts, last_lsn = excluded.last_lsn, "
            "applied_at = excluded.applied_at",
            {"lsn": self.lsn, "ts": commit_ts},
        )


def sample_dashboard() -> Dashboard:
    """The payments dashboard over the sample store (and the fintech rollup's shape)."""
    where = "bucket >= $from AND bucket < $to AND {filters}"
    view = "rollup.tx_volume_5m"
    drill = Drill(table="mirror.transactions", time_column="created_at")
    return Dashboard(
        name="payments",
        title="Payments",
        dimension_source="rollup.tx_volume_5m",
        account_table="mirror.accounts",
        dimensions=[Dimension(name=d) for d in DIMENSIONS],
        tiles=[
            Tile(
                name="tx_count",
                title="Transactions",
                chart=ChartType.STAT,
                query=f"SELECT coalesce(sum(tx_count), 0) AS transactions "
                f"FROM {view} WHERE {where}",
            ),
            Tile(
                name="volume",
                title="Volume",
                chart=ChartType.STAT,
                query=f"SELECT coalesce(sum(volume), 0) AS volume FROM {view} WHERE {where}",
            ),
            Tile(
                name="avg_amount",
                title="Average amount",
                chart=ChartType.STAT,
                query="SELECT round(sum(volume) / nullif(sum(tx_count), 0), 2) AS avg_amount "
                f"FROM {view} WHERE {where}",
            ),
            Tile(
                name="volume_5m",
                title="Volume per 5 minutes",
                chart=ChartType.TIMESERIES,
                width=2,
                query=f"SELECT bucket, sum(volume) AS volume FROM {view} WHERE {where} "
                "GROUP BY bucket ORDER BY bucket",
                drill=drill,
            ),
            Tile(
                name="count_5m",
                title="Transactions per 5 minutes",
                chart=ChartType.TIMESERIES,
                width=2,
                query="SELECT bucket, sum(tx_count) AS transactions, "
                "sum(tx_count) FILTER (WHERE status = 'declined') AS declined "
                f"FROM {view} WHERE {where} GROUP BY bucket ORDER BY bucket",
                drill=drill,
            ),
            Tile(
                name="by_channel",
                title="Volume by channel",
                chart=ChartType.BAR,
                query=f"SELECT channel, sum(volume) AS volume FROM {view} WHERE {where} "
                "GROUP BY channel ORDER BY volume DESC",
            ),
            Tile(
                name="recent",
                title="Recent transactions",
                chart=ChartType.TABLE,
                width=2,
                query="SELECT created_at, id, account_id, amount, currency, channel, status, "
                "card_number, ip FROM mirror.transactions "
                "WHERE created_at >= $from AND created_at < $to AND {filters} "
                "ORDER BY created_at DESC, id DESC LIMIT 15",
            ),
            Tile(
                name="alerts",
                title="Alerts",
                chart=ChartType.ALERTS,
                dimensions=[],
                query="SELECT detected_at, severity, rule, account_id, key FROM headrace.alerts "
                "WHERE detected_at >= $from ORDER BY detected_at DESC LIMIT 50",
            ),
        ],
    )
