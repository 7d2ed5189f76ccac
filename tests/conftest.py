"""Fixtures shared by every test: a real PostgreSQL cluster and per-test databases."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from headrace.sandbox.postgres import ThrowawayPostgres

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[ThrowawayPostgres]:
    """One real PostgreSQL server (wal_level=logical) for the whole test session."""
    cluster = ThrowawayPostgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class PgDatabase:
    """A fresh database in the session's cluster, dropped after the test."""

    cluster: ThrowawayPostgres
    name: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name)

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn, autocommit=autocommit)

    def execute(self, sql: str, params: tuple[object, ...] | None = None) -> None:
        with self.connect() as conn:
            conn.execute(sql.encode() if params is None else sql, params)

    def fetchall(
        self, sql: str, params: tuple[object, ...] | None = None
    ) -> list[tuple[object, ...]]:
        with self.connect() as conn:
            return conn.execute(sql, params).fetchall()


def drop_database(cluster: ThrowawayPostgres, name: str) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture
def pg_db(pg_cluster: ThrowawayPostgres) -> Iterator[PgDatabase]:
    """A new, empty database for one test."""
    name = f"t{next(_db_counter)}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield PgDatabase(pg_cluster, name)
    finally:
        drop_database(pg_cluster, name)
