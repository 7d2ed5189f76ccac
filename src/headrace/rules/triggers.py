"""The batch's transaction triggers of every rule, computed once per batch.

A rule's *triggers* are the transactions of the batch that can complete its
pattern (see :meth:`~headrace.rules.base.RuleJob.tx_triggers`): end rows
matching the rule's filter that are new, whose watched columns changed, or
that did not match before the batch, within the rule's horizon.

Every rule reads the same end rows, commit times and start rows, so instead
of each rule joining them again inside the shared candidates statement, one
statement writes them to the temp table :data:`TX_TRIGGERS` with one boolean
column per rule (its trigger condition), keeping only rows some rule
triggers on. A rule's triggers are then ``SELECT ... FROM _job_tx WHERE
<its column>``. On DuckDB a statement costs milliseconds in planning and
scheduling whatever its size, so one join instead of six matters more than
the rows it reads; and a rule none of whose triggers is present is left
out of the candidates statement altogether. Where it is cheap, a rule's
prefilter is its whole candidate condition (velocity burst, amount spike,
impossible travel; account takeover's balance share), so in most batches no
rule has a trigger and the candidates statement, by far the costliest to
plan (tens of milliseconds), does not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

from headrace.jobs.base import TableDelta
from headrace.pipeline.model import quote_ident
from headrace.rules.config import TransactionsTable
from headrace.source.changes import LSN
from headrace.store.duckdb.results import rows_written

TX_TRIGGERS = "_job_tx"
"""Temp table of the batch's transaction triggers (module docstring)."""

TX_FIELDS = (
    "account",
    "t",
    "amount",
    "merchant",
    "card",
    "country",
    "device",
    "status",
    "channel",
    "type",
)
"""Names of a transaction's columns in rule state and triggers (``_k0`` is its key)."""


def tx_columns(tx: TransactionsTable) -> tuple[tuple[str, str], ...]:
    """(state name, SQL over the source row) of :data:`TX_FIELDS`."""
    sources = (
        tx.account,
        tx.time,
        tx.amount,
        tx.merchant,
        tx.card,
        tx.country,
        tx.device,
        tx.status,
        tx.channel,
        tx.type,
    )
    out = []
    for name, column in zip(TX_FIELDS, sources, strict=True):
        sql = quote_ident(column)
        if name == "t":
            sql = f"CAST({sql} AS TIMESTAMPTZ)"
        out.append((name, sql))
    return tuple(out)


@dataclass(frozen=True)
class TriggerSpec:
    """One rule's trigger condition in one batch.

    ``columns`` are the source columns whose change re-triggers a row;
    ``where`` (SQL over the source row) is the rule's filter; rows with
    event time before ``horizon`` do not trigger. ``prefilter`` (SQL over
    the trigger row ``e``'s rule-shaped fields, e.g. ``e.amount >= 500``;
    it may read the rule's state as updated for the batch) drops rows that
    cannot become a candidate anyway: it must be implied by the rule's
    candidate condition, so it changes no result, and most batches then
    leave the rule out of the candidates statement.
    """

    rule: str
    delta: TableDelta
    columns: tuple[str, ...]
    where: str
    horizon: datetime
    prefilter: str = "true"

    @property
    def flag(self) -> str:
        """Quoted name of the rule's column in :data:`TX_TRIGGERS`."""
        return quote_ident(f"_trig_{self.rule}")

    def select(self) -> str:
        """SQL: this rule's triggers (``_k0``, :data:`TX_FIELDS`, ``commit_ts``, ``lsn``)."""
        keys = [f"_k{i}" for i in range(len(self.delta.key))]
        columns = ", ".join([*keys, *TX_FIELDS, "commit_ts", "lsn"])
        return f"(SELECT {columns} FROM {TX_TRIGGERS} WHERE {self.flag})"


def create_tx_triggers(
    con: duckdb.DuckDBPyConnection,
    tx: TransactionsTable,
    specs: Sequence[TriggerSpec],
    extra: str = "",
) -> dict[str, int]:
    """Write :data:`TX_TRIGGERS` for ``specs`` (one delta); the triggers per rule.

    ``extra``: an SQL select item over the end row ``e`` that the prefilters read, computed
    only for the rows passing some rule's cheap conditions, e.g. the rules' checks over
    their recent transactions (:meth:`~headrace.rules.recent.RecentTransactions.check`).
    """
    if not specs:
        return {}
    delta = specs[0].delta
    if any(spec.delta is not delta for spec in specs):
        raise ValueError("the rules' triggers must read one transactions delta")
    keys = [f"{quote_ident(k)} AS _k{i}" for i, k in enumerate(delta.key)]
    fields = [f"{sql} AS {name}" for name, sql in tx_columns(tx)]
    watched = list(dict.fromkeys(c for spec in specs for c in spec.columns))
    slots = {column: f"_w{i}" for i, column in enumerate(watched)}
    watched_sql = [f"{quote_ident(c)} AS {slots[c]}" for c in watched]
    matches = [f"coalesce(({spec.where}), false) AS _m{i}" for i, spec in enumerate(specs)]
    key_match = " AND ".join(f"e._k{i} = s._k{i}" for i in range(len(delta.key)))
    # Two levels: the cheap conditions (filter, change, horizon) first, so the prefilters
    # (subqueries over rule state) are computed only for the rows that pass them.
    cheap = []
    for i, spec in enumerate(specs):
        differs = " OR ".join(f"e.{slots[c]} IS DISTINCT FROM s.{slots[c]}" for c in spec.columns)
        cheap.append(
            f"(e._m{i} AND (s._k0 IS NULL OR {differs or 'false'} OR NOT s._m{i}) "
            f"AND e.t >= '{spec.horizon.isoformat()}') AS _c{i}"
        )
    flags = [f"(e._c{i} AND ({spec.prefilter})) AS {spec.flag}" for i, spec in enumerate(specs)]
    names = [f"_k{i}" for i in range(len(delta.key))] + list(TX_FIELDS)
    rows = ", ".join(f"e.{n}" for n in [*names, "commit_ts", "lsn"])
    extra_item = f", {extra}" if extra else ""
    created = con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {TX_TRIGGERS} AS
        SELECT * FROM (
            SELECT {rows}, {", ".join(flags)}
            FROM (SELECT e.*{extra_item}
                  FROM (SELECT {rows}, {", ".join(cheap)}
                        FROM (SELECT {", ".join([*keys, *fields, *watched_sql, *matches])},
                                     _hr_commit_ts AS commit_ts, {LSN} AS lsn
                              FROM {delta.end_rows()}) e
                        LEFT JOIN (SELECT {", ".join([*keys, *watched_sql, *matches])}
                                   FROM {delta.start}) s ON {key_match}) e
                  WHERE {" OR ".join(f"e._c{i}" for i in range(len(specs)))}) e)
        WHERE {" OR ".join(spec.flag for spec in specs)}"""
    )
    total = rows_written(created)
    if total == 0:
        return {spec.rule: 0 for spec in specs}
    if len(specs) == 1:
        return {specs[0].rule: total}
    counts = con.execute(
        f"SELECT {', '.join(f'count(*) FILTER (WHERE {spec.flag})' for spec in specs)} "
        f"FROM {TX_TRIGGERS}"
    ).fetchall()[0]
    return {spec.rule: int(n) for spec, n in zip(specs, counts, strict=True)}
