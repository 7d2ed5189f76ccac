"""The demo schema applies cleanly, twice, refuses foreign tables, and enforces its rules."""

from __future__ import annotations

import psycopg
import pytest

from headrace.demo.schema import (
    ALL_TABLES,
    SCHEMA_MARKER,
    apply_schema,
    bulk_load_mode,
    drop_schema,
)
from headrace.errors import ConfigError
from tests.conftest import PgDatabase


def _tables(pg_db: PgDatabase) -> set[str]:
    rows = pg_db.fetchall("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {str(name) for (name,) in rows}


def _constraints_and_indexes(
    conn: psycopg.Connection[tuple[object, ...]],
) -> list[tuple[object, ...]]:
    return conn.execute(
        "SELECT conname FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
        "UNION ALL SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
    ).fetchall()


def test_applies_twice(pg_db: PgDatabase) -> None:
    with pg_db.connect() as conn:
        apply_schema(conn)
        first = _constraints_and_indexes(conn)
        apply_schema(conn)
        assert _constraints_and_indexes(conn) == first
    assert _tables(pg_db) == set(ALL_TABLES)
    (marker,) = pg_db.fetchall("SELECT obj_description('public.customers'::regclass)")
    assert marker == (SCHEMA_MARKER,)


def test_refuses_a_foreign_table_of_the_same_name(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE customers (id int)")
    with pg_db.connect() as conn, pytest.raises(ConfigError, match="not headrace's"):
        apply_schema(conn)
    assert _tables(pg_db) == {"customers"}


def test_drop_removes_everything(pg_db: PgDatabase) -> None:
    with pg_db.connect() as conn:
        apply_schema(conn)
        drop_schema(conn)
        drop_schema(conn)  # nothing left to drop is fine
    assert _tables(pg_db) == set()


def _seed_rows(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        "INSERT INTO customers (full_name, email, country, created_at) "
        "VALUES ('A B', 'a@example.com', 'DE', '2026-01-01Z')"
    )
    conn.execute(
        "INSERT INTO accounts (customer_id, tier, currency, opened_at, updated_at) "
        "VALUES (1, 'basic', 'EUR', '2026-01-01Z', '2026-01-01Z')"
    )


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        (
            "INSERT INTO transactions (account_id, amount, currency, channel, type, status, "
            "country, created_at, updated_at) VALUES (1, 0, 'EUR', 'transfer', 'transfer_in', "
            "'pending', 'DE', now(), now())",
            "amount_check",
        ),
        (
            "INSERT INTO transactions (account_id, amount, currency, channel, type, status, "
            "country, created_at, updated_at) VALUES (1, 5, 'EUR', 'transfer', 'transfer_in', "
            "'lost', 'DE', now(), now())",
            "status_check",
        ),
        (
            "INSERT INTO transactions (account_id, amount, currency, channel, type, status, "
            "country, created_at, updated_at) VALUES (1, 5, 'EUR', 'pos', 'purchase', "
            "'pending', 'DE', now(), now())",
            "check",  # card-present without a card
        ),
        (
            "INSERT INTO transactions (account_id, amount, currency, channel, type, status, "
            "country, created_at, updated_at) VALUES (1, 5, 'EUR', 'transfer', 'transfer_in', "
            "'declined', 'DE', now(), now())",
            "check",  # declined without a reason
        ),
        (
            "INSERT INTO ledger_entries (account_id, kind, delta, balance_after, at) "
            "VALUES (1, 'settlement', 5, 5, now())",
            "check",  # a settlement needs its transaction
        ),
        (
            "INSERT INTO logins (customer_id, success, device, ip, country, at) "
            "VALUES (1, false, 'd', '10.0.0.1', 'DE', now())",
            "check",  # a failure needs its reason
        ),
        (
            "INSERT INTO accounts (customer_id, tier, currency, opened_at, updated_at) "
            "VALUES (99, 'basic', 'EUR', now(), now())",
            "fkey",
        ),
    ],
)
def test_constraints_reject_bad_rows(pg_db: PgDatabase, sql: str, constraint: str) -> None:
    with pg_db.connect() as conn:
        apply_schema(conn)
        _seed_rows(conn)
        with pytest.raises(psycopg.errors.IntegrityError, match=constraint):
            conn.execute(sql.encode())


def test_hand_written_inserts_use_the_identity_default(pg_db: PgDatabase) -> None:
    with pg_db.connect() as conn:
        apply_schema(conn)
        _seed_rows(conn)
        row = conn.execute(
            "INSERT INTO transactions (account_id, amount, currency, channel, type, status, "
            "country, created_at, updated_at) VALUES (1, 12.345, 'EUR', 'transfer', "
            "'transfer_in', 'pending', 'DE', now(), now()) RETURNING id, amount::text"
        ).fetchone()
    assert row == (1, "12.35")


def test_bulk_load_mode_restores_keys_and_indexes(pg_db: PgDatabase) -> None:
    with pg_db.connect() as conn:
        apply_schema(conn)
        before = _constraints_and_indexes(conn)
        with conn.transaction(), bulk_load_mode(conn):
            during = _constraints_and_indexes(conn)
            _seed_rows(conn)
        assert _constraints_and_indexes(conn) == before
        assert len(during) < len(before)
        with (
            pytest.raises(psycopg.errors.ForeignKeyViolation),
            conn.transaction(),
            bulk_load_mode(conn),
        ):
            conn.execute(
                "INSERT INTO accounts (customer_id, tier, currency, opened_at, updated_at) "
                "VALUES (42, 'basic', 'EUR', now(), now())"
            )
        assert _constraints_and_indexes(conn) == before
