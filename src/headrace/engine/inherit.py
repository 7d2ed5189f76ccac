"""Values a change inherits from its row's previous version: unchanged TOAST values and
commit-time event times.

pgoutput sends an update without the TOAST columns it did not change, and a table
whose event time is its commit time keeps the time of the row's insert. Both come
from the row's previous version: the previous change of the same row in the batch
(``_hr_p_i``, found with an ASOF join on the key; key moves are followed) or, at the
start of the chain, the mirror row. The chain is resolved by pointer jumping:
O(log n) statements for a row changed n times in one batch.
"""

from __future__ import annotations

import duckdb

from headrace.engine.resolve import TableWork, old_key
from headrace.engine.tables import TableModel
from headrace.pipeline.model import quote_ident, quote_literal
from headrace.source.changes import OP, SEQ, TOAST
from headrace.store.duckdb.schema import EVENT_TS


def _key_match(model: TableModel, left: str, left_cols: list[str], right: str) -> str:
    return " AND ".join(
        f"{left}.{lc} = {right}.{quote_ident(k)}"
        for lc, k in zip(left_cols, model.key, strict=True)
    )


def compute_prev(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """``_hr_p_i``: for each update/delete, the batch's previous version of its row (or NULL)."""
    model, c = work.model, work.changes
    old = [old_key(j) for j in range(len(model.key))]
    new = [quote_ident(k) for k in model.key]
    condition = " AND ".join(f"p.{n} = u.{o}" for n, o in zip(new, old, strict=True))
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {work.prev} AS
        SELECT u.{SEQ}, p.{SEQ} AS _hr_prev
        FROM (SELECT {SEQ}, {", ".join(old)} FROM {c} WHERE {OP} IN ('U', 'D')) u
        ASOF LEFT JOIN (SELECT {SEQ}, {", ".join(new)} FROM {c} WHERE {OP} IN ('I', 'U')) p
          ON {condition} AND u.{SEQ} > p.{SEQ}"""
    )
    work.has_prev = True


def needs_prev(work: TableWork) -> bool:
    model = work.model
    return (
        work.toasted > 0
        or (model.commit_time and work.updates > 0)
        or (model.config.history and model.config.mirror and work.deletes > 0)
    )


def fill_inherited(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """Fill unchanged TOAST values and inherited event times from each row's previous version."""
    model = work.model
    if not model.config.mirror:
        return
    if needs_prev(work) and not work.has_prev:
        compute_prev(con, work)
    if work.toasted:
        rows = con.execute(
            f"SELECT DISTINCT unnest({TOAST}) FROM {work.changes} WHERE len({TOAST}) > 0"
        ).fetchall()
        for (name,) in rows:
            if model.column(str(name)) is None:
                continue
            provides = (
                f"({{a}}.{OP} = 'I' OR {{a}}.{TOAST} IS NULL "
                f"OR NOT list_contains({{a}}.{TOAST}, {quote_literal(str(name))}))"
            )
            _inherit(con, work, quote_ident(str(name)), provides)
    if model.commit_time and work.updates:
        _inherit(con, work, EVENT_TS, f"({{a}}.{OP} = 'I')")


def _inherit(con: duckdb.DuckDBPyConnection, work: TableWork, column: str, provides: str) -> None:
    """Set ``column`` of every non-providing version to the value of its chain's provider.

    ``provides`` is SQL with ``{a}`` standing for the change's alias: true
    when the change carries its own value of ``column``.
    """
    model, c = work.model, work.changes
    own = provides.format(a="c")
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _hr_fa AS
        SELECT c.{SEQ} AS seq,
               CASE WHEN {own} OR p._hr_prev IS NULL THEN c.{SEQ} ELSE p._hr_prev END AS ptr,
               ({own} OR p._hr_prev IS NULL) AS done
        FROM {c} c LEFT JOIN {work.prev} p ON p.{SEQ} = c.{SEQ}
        WHERE c.{OP} IN ('I', 'U')"""
    )
    current, other = "_hr_fa", "_hr_fb"
    while con.execute(f"SELECT count(*) FROM {current} WHERE NOT done").fetchall()[0][0]:
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE {other} AS
            SELECT a.seq, CASE WHEN a.done THEN a.ptr ELSE b.ptr END AS ptr,
                   CASE WHEN a.done THEN true ELSE b.done END AS done
            FROM {current} a LEFT JOIN {current} b ON b.seq = a.ptr"""
        )
        current, other = other, current
    olds = [old_key(j) for j in range(len(model.key))]
    con.execute(
        f"""UPDATE {c} SET {column} = s.v FROM (
            SELECT f.seq,
                   CASE WHEN {provides.format(a="t")} THEN t.{column} ELSE m.{column} END AS v
            FROM {current} f
            JOIN {c} self ON self.{SEQ} = f.seq
            JOIN {c} t ON t.{SEQ} = f.ptr
            LEFT JOIN {model.mirror} m ON {_key_match(model, "t", olds, "m")}
            WHERE NOT {provides.format(a="self")}
        ) s WHERE {c}.{SEQ} = s.seq"""
    )
    con.execute(f"DROP TABLE IF EXISTS {other}")
    con.execute(f"DROP TABLE IF EXISTS {current}")
