"""Checks run before streaming, each failing with what happened and what to do.

They run on an ordinary (non-replication) connection so the messages are
ours, not the walsender's: ``wal_level``, the REPLICATION privilege, the
configured tables, the publication (created when missing and allowed), and
the slot (dropped, invalidated, in use, or no free slot left to create it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from headrace.errors import SourceError, format_lsn
from headrace.source.changes import TableRef

Connection = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True)
class SlotState:
    """A row of ``pg_replication_slots`` for one slot."""

    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active_pid: int | None
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    wal_status: str | None


class SlotInUseError(SourceError):
    """The slot is held by another process (maybe one that just died): worth a short wait."""


def check_server(conn: Connection) -> None:
    """``wal_level`` is ``logical`` and the user may replicate."""
    (wal_level,) = _one(conn, "SELECT current_setting('wal_level')")
    if wal_level != "logical":
        raise SourceError(
            f"the server runs with wal_level = {wal_level}; logical replication needs 'logical'",
            "run ALTER SYSTEM SET wal_level = logical; as a superuser, then restart PostgreSQL "
            "(the setting only takes effect at server start)",
        )
    user, can_replicate, is_superuser = _one(
        conn,
        "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    if not (can_replicate or is_superuser):
        raise SourceError(
            f"the user {user} has no REPLICATION privilege, so it cannot stream changes",
            f"as a superuser run: ALTER ROLE {sql_ident(str(user))} WITH REPLICATION; "
            "(and make sure pg_hba.conf allows 'replication' connections for it)",
        )


def server_not_ready(conn: Connection) -> SourceError | None:
    """What :func:`check_server` would raise, or None: for commands that report it
    without stopping (``headrace init``, ``headrace validate --connect``)."""
    try:
        check_server(conn)
    except SourceError as exc:
        return exc
    return None


def check_tables(conn: Connection, tables: Sequence[TableRef]) -> dict[TableRef, str]:
    """Every configured table exists; returns each table's replica identity letter."""
    identities: dict[TableRef, str] = {}
    for table in tables:
        row = conn.execute(
            "SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i "
            "  WHERE i.indrelid = c.oid AND i.indisprimary) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (table.schema, table.name),
        ).fetchone()
        if row is None:
            raise SourceError(
                f"the table {table} does not exist in database {conn.info.dbname}",
                "create it, or fix the table name (write it schema-qualified, e.g. "
                "public.orders; names are case-sensitive as PostgreSQL stores them)",
            )
        ident, has_pk = str(row[0]), bool(row[1])
        identities[table] = "n" if ident == "d" and not has_pk else ident
    return identities


def ensure_publication(
    conn: Connection, publication: str, tables: Sequence[TableRef], *, create: bool
) -> bool:
    """The publication exists and publishes every configured table.

    When it is missing and ``create`` is set, creates it for exactly the
    configured tables and returns True.
    """
    identities = check_tables(conn, tables)
    row = conn.execute(
        "SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    table_list = ", ".join(str(t) for t in tables)
    if row is None:
        if not create:
            raise SourceError(
                f"the publication {publication} does not exist",
                f"create it: CREATE PUBLICATION {sql_ident(publication)} FOR TABLE {table_list};",
            )
        _refuse_tables_without_identity(identities)
        statement = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(publication),
            sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables),
        )
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SourceError(
                f"could not create the publication {publication}: {exc.diag.message_primary}",
                "create it as the owner of the tables (or a superuser): "
                f"CREATE PUBLICATION {sql_ident(publication)} FOR TABLE {table_list};",
            ) from exc
        except psycopg.errors.DuplicateObject:
            return False  # another process created it at the same moment
        return True
    if row[0]:
        return False
    published = {
        TableRef(str(schema), str(name))
        for schema, name in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        ).fetchall()
    }
    missing = [t for t in tables if t not in published]
    if missing:
        names = ", ".join(str(t) for t in missing)
        raise SourceError(
            f"the publication {publication} does not publish {names}",
            f"add them: ALTER PUBLICATION {sql_ident(publication)} ADD TABLE {names}; "
            "(or configure another publication name)",
        )
    return False


def _refuse_tables_without_identity(identities: dict[TableRef, str]) -> None:
    # Publishing a table without a replica identity makes every UPDATE and
    # DELETE on it fail in production: refuse instead of breaking the source.
    lacking = [t for t, ident in identities.items() if ident == "n"]
    if lacking:
        names = ", ".join(str(t) for t in lacking)
        raise SourceError(
            f"{names} has no primary key and no replica identity; publishing it would make "
            "every UPDATE and DELETE on it fail",
            f"add a primary key, or run ALTER TABLE {lacking[0]} REPLICA IDENTITY FULL;",
        )


def slot_state(conn: Connection, slot: str) -> SlotState | None:
    """The slot's row of ``pg_replication_slots``, None if there is no such slot."""
    row = conn.execute(
        "SELECT slot_name, plugin, slot_type, database, temporary, active_pid, "
        "restart_lsn::text, confirmed_flush_lsn::text, wal_status "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotState(
        name=str(row[0]),
        plugin=None if row[1] is None else str(row[1]),
        slot_type=str(row[2]),
        database=None if row[3] is None else str(row[3]),
        temporary=bool(row[4]),
        active_pid=None if row[5] is None else int(str(row[5])),
        restart_lsn=_lsn_or_none(row[6]),
        confirmed_flush_lsn=_lsn_or_none(row[7]),
        wal_status=None if row[8] is None else str(row[8]),
    )


def check_slot(
    conn: Connection, slot: str, *, start_position: int, allow_ahead: bool = False
) -> SlotState | None:
    """The slot can be streamed from ``start_position`` (0: wherever it stands).

    Returns the slot's state, or None when it does not exist and may be
    created (``start_position`` 0: nothing was streamed from it yet). A slot
    already past ``start_position`` is an error unless ``allow_ahead``.
    """
    state = slot_state(conn, slot)
    dbname = conn.info.dbname
    if state is None:
        if start_position:
            raise slot_dropped(slot, start_position)
        check_slot_capacity(conn)
        return None
    if state.slot_type != "logical" or state.plugin != "pgoutput":
        raise SourceError(
            f"the replication slot {slot} is a {state.slot_type} slot with plugin "
            f"{state.plugin}; headrace needs a logical slot with pgoutput",
            "configure another slot name (headrace creates it), or drop this one if unused",
        )
    if state.database != dbname:
        raise SourceError(
            f"the replication slot {slot} belongs to database {state.database}, not {dbname}",
            "configure another slot name for this database",
        )
    if state.wal_status == "lost" or state.restart_lsn is None:
        raise slot_invalidated(slot, "it fell behind by more than max_slot_wal_keep_size")
    if state.active_pid is not None:
        raise slot_in_use(slot, state.active_pid)
    confirmed = state.confirmed_flush_lsn or 0
    if start_position and confirmed > start_position and not allow_ahead:
        raise SourceError(
            f"the replication slot {slot} has already moved to {format_lsn(confirmed)}, past "
            f"the stored position {format_lsn(start_position)}: the changes in between "
            "cannot be streamed again",
            "start over from a new snapshot; another consumer may be using the same slot "
            "(give each pipeline its own slot name)",
        )
    return state


def check_slot_capacity(conn: Connection) -> None:
    """A new slot can be created (``max_replication_slots`` not exhausted)."""
    used, limit = _one(
        conn,
        "SELECT (SELECT count(*) FROM pg_replication_slots), "
        "current_setting('max_replication_slots')::int",
    )
    if int(str(used)) >= int(str(limit)):
        raise slots_exhausted(int(str(limit)))


def slots_exhausted(limit: int | None = None) -> SourceError:
    """The error for "no free replication slot" (also raised when creation fails so)."""
    count = f"all {limit}" if limit is not None else "all"
    return SourceError(
        f"{count} replication slots of the server are in use (max_replication_slots)",
        "drop slots nobody uses (SELECT slot_name, active FROM pg_replication_slots; then "
        "SELECT pg_drop_replication_slot('name');) or raise max_replication_slots and "
        "restart PostgreSQL",
    )


def slot_in_use(slot: str, holder: int | str | None) -> SlotInUseError:
    """The error for a slot another process streams from.

    ``holder`` is the PID of the process holding it, or a description of it.
    """
    if isinstance(holder, int):
        who, end_it = f"PID {holder}", f" (or end it: SELECT pg_terminate_backend({holder});)"
    else:
        who, end_it = holder or "another connection", ""
    return SlotInUseError(
        f"the replication slot {slot} is in use by another process ({who})",
        f"stop the other consumer of this slot{end_it}, or configure another slot name",
    )


def slot_invalidated(slot: str, detail: str = "") -> SourceError:
    """The error for a slot whose WAL the server removed."""
    because = f" ({detail})" if detail else ""
    return SourceError(
        f"the replication slot {slot} was invalidated: the server removed WAL it still "
        f"needed{because}, so changes are lost",
        f"drop it (SELECT pg_drop_replication_slot('{slot}');) and start over from a new "  # noqa: S608 - advice shown to the user, never executed
        "snapshot; raise max_slot_wal_keep_size or keep headrace running to avoid it",
    )


def slot_dropped(slot: str, position: int) -> SourceError:
    """The error for a slot that vanished while a stored position still needs it."""
    return SourceError(
        f"the replication slot {slot} does not exist, but the stored position is "
        f"{format_lsn(position)}: the slot was dropped, and the changes made "
        "since that position are gone",
        "start over from a new snapshot (headrace capture --snapshot, or reset the "
        "pipeline's store); to keep a slot safe, do not drop it while headrace uses it",
    )


def explain_slot_error(slot: str, position: int, exc: psycopg.Error) -> SourceError | None:
    """Our message for a server error on CREATE_REPLICATION_SLOT / START_REPLICATION.

    None when the error is not one we know (the caller re-raises it).
    """
    message = exc.diag.message_primary or str(exc)
    detail = exc.diag.message_detail or ""
    if isinstance(exc, psycopg.errors.ObjectInUse):
        match = re.search(r"PID (\d+)", message)
        return slot_in_use(slot, int(match.group(1)) if match else None)
    if isinstance(exc, psycopg.errors.UndefinedObject) and "does not exist" in message:
        return slot_dropped(slot, position)
    if "invalidated" in (message + detail) or "has already been removed" in message:
        return slot_invalidated(slot, detail or message)
    if isinstance(exc, psycopg.errors.ConfigurationLimitExceeded):
        return slots_exhausted()
    return None


def sql_ident(name: str) -> str:
    """``name`` quoted only when it needs it, for messages users copy and paste."""
    if name.isidentifier() and name == name.lower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def _one(conn: Connection, query: str) -> tuple[object, ...]:
    row = conn.execute(query.encode()).fetchone()
    if row is None:  # pragma: no cover - these queries always return a row
        raise SourceError(f"no row from {query}", "this is a bug in headrace")
    return row


def _lsn_or_none(value: object) -> int | None:
    if value is None:
        return None
    high, _, low = str(value).partition("/")
    return (int(high, 16) << 32) | int(low, 16)
