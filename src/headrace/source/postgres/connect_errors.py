"""Why a replication connection failed, and whether a retry can help."""

from __future__ import annotations

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


def connect_error(exc: psycopg.OperationalError) -> SourceError:
    """The error for a failed replication connection: final or worth a retry."""
    text = str(exc)
    for needle, (what, fix) in _FINAL_CONNECT_ERRORS.items():
        if needle in text:
            return SourceError(f"{what}: {first_line(exc)}", fix)
    return ConnectionLostError(
        f"could not open a replication connection: {first_line(exc)}",
        "check that the server is up and the DSN is right; headrace retries by itself",
    )
