"""Why a connection to the source failed, and whether a retry can help."""

from __future__ import annotations

from typing import Any

import psycopg

from headrace.errors import SourceError, first_line


class ConnectionLostError(SourceError):
    """The replication connection broke (network, server restart, termination).

    The source reconnects after this error; every other :class:`SourceError`
    is final.
    """


# Connection failures no retry can fix (the others: server down, restarting,
# out of walsenders for a moment... are worth retrying).
_FINAL_CONNECT_ERRORS = {
    "must be superuser or replication role": (
        "the user has no REPLICATION privilege",
        "as a superuser run: ALTER ROLE <user> WITH REPLICATION;",
    ),
    "no pg_hba.conf entry": (
        "pg_hba.conf does not allow this replication connection",
        "add a line such as 'host replication <user> <client address>/32 scram-sha-256' to "
        "pg_hba.conf and reload PostgreSQL",
    ),
    "password authentication failed": (
        "password authentication failed",
        "fix the user or password in the DSN",
    ),
    "does not exist": (
        "the database or user of the DSN does not exist",
        "fix the DSN (dbname=..., user=...)",
    ),
}

# The same for an ordinary SQL connection (no replication privilege needed).
_FINAL_SQL_CONNECT_ERRORS = {
    "no pg_hba.conf entry": (
        "pg_hba.conf does not allow this connection",
        "add a line such as 'host <database> <user> <client address>/32 scram-sha-256' to "
        "pg_hba.conf and reload PostgreSQL",
    ),
    "password authentication failed": _FINAL_CONNECT_ERRORS["password authentication failed"],
    "does not exist": _FINAL_CONNECT_ERRORS["does not exist"],
}


def connect_error(exc: psycopg.OperationalError) -> SourceError:
    """The error for a failed replication connection: final or worth a retry."""
    return _explained(
        exc,
        _FINAL_CONNECT_ERRORS,
        f"could not open a replication connection: {first_line(exc)}",
        "check that the server is up and the DSN is right; headrace retries by itself",
    )


def connect_sql(dsn: str, **settings: Any) -> psycopg.Connection[tuple[Any, ...]]:
    """An ordinary SQL connection to the source database (``settings`` go to
    :func:`psycopg.connect`). A failure raises a :class:`SourceError` saying what
    went wrong and what to do (a :class:`ConnectionLostError` when it may pass by
    itself: the server down or restarting), never a bare driver error."""
    try:
        return psycopg.connect(dsn, **settings)
    except psycopg.OperationalError as exc:
        raise _explained(
            exc,
            _FINAL_SQL_CONNECT_ERRORS,
            f"cannot connect to the source database: {first_line(exc)}",
            "check that PostgreSQL is running and that source.dsn (or the variable named by "
            "source.dsn_env) points at it: host, port, database and user",
        ) from exc


def _explained(
    exc: psycopg.OperationalError, final: dict[str, tuple[str, str]], what: str, fix: str
) -> SourceError:
    """The final error of ``final`` whose text the driver's message holds, else a
    :class:`ConnectionLostError` (``what``, ``fix``): worth a retry."""
    text = str(exc)
    for needle, (final_what, final_fix) in final.items():
        if needle in text:
            return SourceError(f"{final_what}: {first_line(exc)}", final_fix)
    return ConnectionLostError(what, fix)
