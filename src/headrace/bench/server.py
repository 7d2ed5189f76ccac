"""A PostgreSQL server the user names for a benchmark (``--server DSN``).

The benchmarks start a throwaway cluster on the machine headrace runs on, so
PostgreSQL, the workload generator and headrace share its cores: on the 2-core
development machine, at 100,000 changes/s PostgreSQL alone takes 1.2-1.4 cores.
In production PostgreSQL runs on a machine of its own; ``--server`` measures
that case against a server elsewhere.

The benchmark works in a database of its own on that server, created for the
run (``hr_bench_<random>``) and dropped after it, together with the
replication slots made in it (a publication lives in its database and goes
with it). Nothing of the server's other databases is read or changed. The
server's CPU is not measured: its processes are on another machine.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from headrace.errors import ConfigError, HeadraceError
from headrace.sandbox.postgres import ThrowawayPostgres, find_bindir

DATABASE_PREFIX = "hr_bench_"
SLOT_RELEASE_S = 10.0
"""How long dropping the database waits for a slot of it to be released (headrace's and
``pg_recvlogical``'s connections close when they stop)."""


class BenchServerError(HeadraceError):
    """The server named with ``--server`` cannot carry a benchmark."""


def describe_server(dsn: str) -> str:
    """Where ``dsn`` points, without its password (for the benchmark's printout)."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise BenchServerError(
            f"--server is not a valid connection string: {exc}",
            "give a libpq DSN, e.g. 'host=db.example port=5432 user=postgres' or "
            "'postgresql://postgres@db.example/postgres'",
        ) from exc
    host = parts.get("host") or "the default socket"
    port = parts.get("port") or "5432"
    user = parts.get("user") or "the current user"
    return f"{host}:{port} as {user}"


class ExternalPostgres:
    """A benchmark's own database on the server ``server`` (a libpq DSN of a role that
    can create databases and replication slots, on a server with ``wal_level=logical``).

    A context manager: entering checks the server and creates the database, leaving
    drops the database and its slots. Quacks like
    :class:`~headrace.sandbox.postgres.ThrowawayPostgres` where the benchmark needs it
    (:meth:`dsn`, :attr:`bindir`)."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.where = describe_server(server)
        self.database = f"{DATABASE_PREFIX}{secrets.token_hex(4)}"
        self._created = False

    @property
    def bindir(self) -> Path:
        """Where this machine's ``pg_recvlogical`` is (the backlog mode's peer)."""
        on_path = shutil.which("pg_recvlogical")
        return Path(on_path).parent if on_path else find_bindir()

    def dsn(self, dbname: str | None = None, *, unix: bool = False) -> str:
        """The benchmark's database (``dbname``: another one) on the server; ``unix`` is
        accepted for :class:`ThrowawayPostgres`'s callers and means nothing here."""
        del unix
        return make_conninfo(self.server, dbname=dbname or self.database)

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        try:
            return psycopg.connect(self.server, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise BenchServerError(
                f"cannot connect to the server named with --server ({self.where}): "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}",
                "check the DSN, that the server is up and that it accepts this machine "
                "(pg_hba.conf)",
            ) from exc

    def __enter__(self) -> ExternalPostgres:
        with self._connect() as conn:
            row = conn.execute("SHOW wal_level").fetchone()
            level = str(row[0]) if row else "unknown"
            if level != "logical":
                raise BenchServerError(
                    f"the server named with --server ({self.where}) has wal_level={level}",
                    "set wal_level = logical in its postgresql.conf and restart it",
                )
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
            except psycopg.Error as exc:
                raise BenchServerError(
                    f"cannot create the benchmark's database {self.database} on "
                    f"{self.where}: {str(exc).strip().splitlines()[0]}",
                    "connect as a role with CREATEDB and REPLICATION (or a superuser)",
                ) from exc
        self._created = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._created:
            return
        if exc_type is None:
            self.drop()
            return
        # The run failed already: its error is the one to see, but a database left on
        # the user's server must not go unsaid.
        try:
            self.drop()
        except (psycopg.Error, HeadraceError) as failure:
            sys.stderr.write(
                f"headrace: could not drop the benchmark's database {self.database} on "
                f"{self.where}: {str(failure).strip().splitlines()[0]}\n"
            )

    def drop(self) -> None:
        """Drop the benchmark's replication slots and database (a slot still held once
        :data:`SLOT_RELEASE_S` passed has its connection ended first)."""
        with self._connect() as conn:
            terminated = False
            deadline = time.monotonic() + SLOT_RELEASE_S
            while self._active_slots(conn):
                if time.monotonic() > deadline:
                    if terminated:
                        raise BenchServerError(
                            f"a replication slot of {self.database} on {self.where} stays "
                            "in use, so the benchmark's database was left there",
                            f"drop its slots and then the database by hand: DROP DATABASE "
                            f"{self.database} WITH (FORCE)",
                        )
                    conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                        "WHERE database = %s AND active_pid IS NOT NULL",
                        (self.database,),
                    )
                    terminated = True
                    deadline = time.monotonic() + SLOT_RELEASE_S
                time.sleep(0.1)
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s",
                (self.database,),
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)
                )
            )
        self._created = False

    def _active_slots(self, conn: psycopg.Connection[tuple[object, ...]]) -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = %s AND active",
            (self.database,),
        ).fetchone()
        return int(str(row[0])) if row else 0


def bench_cluster(server: str | None, *, tcp: bool) -> ThrowawayPostgres | ExternalPostgres:
    """The PostgreSQL a benchmark runs on: a throwaway cluster of its own, or its database
    on the ``--server`` one (whose DSN says how to connect: ``--tcp`` is refused with it)."""
    if server is None:
        return ThrowawayPostgres()
    if tcp:
        raise ConfigError(
            "--tcp and --server together: the server's DSN already says how to connect",
            "leave out --tcp (put host=127.0.0.1 in the DSN for TCP to a local server)",
        )
    return ExternalPostgres(server)
