"""The engine's registry of tables and rollups, kept in step with the store.

Tables become known when the source first describes them (a snapshot
chunk, a batch, or :meth:`Registry.declare`). A rollup is set up as soon as
its table and looked-up tables are known: created and built from the mirror
when new, rebuilt when its definition changed since the store last saw it,
left paused when the store says it is paused for the same definition.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import duckdb
import pyarrow as pa

from headrace.engine.compaction import Compactor
from headrace.engine.extremes import MirrorReads
from headrace.engine.key_index import KeyIndexKeeper
from headrace.engine.lookup import fill_lookup_column
from headrace.engine.rollup import RollupPlan, definition_json
from headrace.engine.rollup_view import view_sql
from headrace.engine.tables import (
    ACTIVE,
    DEAD,
    LookupColumn,
    TableModel,
    load_table_model,
    new_table_model,
)
from headrace.errors import ConfigError
from headrace.pipeline.model import COMMIT_TIME, PipelineConfig, RollupConfig, quote_ident
from headrace.source.changes import TableRef, TableSchema
from headrace.store.duckdb.schema import (
    EVENT_TS,
    LOOKUP_PREFIX,
    META,
    ROLLUP,
    is_rollup_table,
    rollup_table_prefix,
    table_exists,
)

log = logging.getLogger(__name__)

PAUSED = "paused"
PENDING = "pending"
NOT_CONFIGURED = "not in the pipeline file any more"


@dataclass
class RollupRuntime:
    """A configured rollup and where it stands."""

    config: RollupConfig
    plan: RollupPlan | None = None
    state: str = PENDING
    reason: str | None = None
    retained_from: datetime | None = None
    appended: int = 0
    """Rows appended to the state and side tables since they were last compacted."""
    compacted_rows: int | None = None
    """Rows of the state and side tables after the last compaction (None: unknown)."""
    compaction: list[tuple[int, int, int]] = field(default_factory=list)
    """Steps left in the current compaction cycle: (table number, slices, slice); table
    number :data:`~headrace.engine.compaction.RESERVES_STEP`: the min/max reserves' upkeep."""
    mirror_reads: MirrorReads = field(default_factory=MirrorReads)
    """How often its min/max read the mirror since the process started."""

    @property
    def active(self) -> bool:
        return self.state == ACTIVE and self.plan is not None


def resolved_time(config: RollupConfig, table: TableModel) -> str:
    time = config.time or table.config.event_time
    return EVENT_TS if time == COMMIT_TIME else time


class Registry:
    """Tables and rollups of one engine (used from the writer thread only)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.tables: dict[TableRef, TableModel] = {}
        self.rollups: dict[str, RollupRuntime] = {r.name: RollupRuntime(r) for r in config.rollups}
        self._settled = False
        """True after a :meth:`setup_rollups` pass (stored rollups no longer configured
        are marked); reset by :meth:`load`."""
        self.compactor = Compactor()
        """Folds the rollups' appended rows between batches."""
        self.key_indexes = KeyIndexKeeper(
            config.store.mirror_key_index, config.store.mirror_key_index_rows
        )
        """Which mirrors have an index on their key (``store.mirror_key_index``)."""
        self.tracking: dict[str, tuple[RollupPlan, str]] = {}
        """Rollups being rebuilt while streaming (:mod:`headrace.engine.rebuild`): the
        new plan and the temp table collecting the groups each batch touches."""

    # ------------------------------------------------------------------ load

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read the tables and rollups the store already holds."""
        self._settled = False
        self.tables.clear()
        for ref, table_config in self.config.table_refs.items():
            model = load_table_model(con, ref, table_config)
            if model is not None:
                self._load_lookups(con, model)
                self.key_indexes.at_load(con, model)
                self.tables[ref] = model
        self.key_indexes.measure(con, self.tables.values())
        stored = self._stored_rollups(con)
        for name, runtime in self.rollups.items():
            runtime.plan = None
            runtime.state, runtime.reason, runtime.retained_from = PENDING, None, None
            runtime.appended, runtime.compacted_rows, runtime.compaction = 0, None, []
            if name in stored:
                runtime.retained_from = stored[name][3]

    def _load_lookups(self, con: duckdb.DuckDBPyConnection, model: TableModel) -> None:
        if not model.config.mirror:
            return
        physical = {
            str(r[0]): str(r[1]) for r in con.execute(f"DESCRIBE {model.mirror}").fetchall()
        }
        for spec in self._lookup_specs(model.ref):
            name = LookupColumn.column_name(spec)
            if name in physical:
                model.lookups[name] = LookupColumn(name, spec, TableRef.parse(spec.table))
                model.lookup_types[name] = physical[name]

    @staticmethod
    def _stored_rollups(
        con: duckdb.DuckDBPyConnection,
    ) -> dict[str, tuple[str, str | None, str, datetime | None, list[str]]]:
        rows = con.execute(
            f"SELECT name, state, reason, definition, retained_from, views FROM {META}.rollups"
        ).fetchall()
        return {
            str(r[0]): (
                str(r[1]),
                None if r[2] is None else str(r[2]),
                str(r[3]),
                cast(datetime | None, r[4]),
                json.loads(str(r[5])) if r[5] is not None else [],
            )
            for r in rows
        }

    # ---------------------------------------------------------------- tables

    def _lookup_specs(self, ref: TableRef) -> list:  # type: ignore[type-arg]
        specs = []
        seen = set()
        for rollup in self.config.rollups:
            if TableRef.parse(rollup.table) != ref:
                continue
            for dim in rollup.dimensions:
                if dim.lookup is not None:
                    name = LookupColumn.column_name(dim.lookup)
                    if name not in seen:
                        seen.add(name)
                        specs.append(dim.lookup)
        return specs

    def declare(self, con: duckdb.DuckDBPyConnection, schema: TableSchema) -> TableModel | None:
        """Make a table known (creating its mirror/history); ``None`` if not configured."""
        ref = schema.table
        model = self.tables.get(ref)
        if model is not None:
            return model
        table_config = self.config.table_refs.get(ref)
        if table_config is None:
            return None
        model = new_table_model(ref, table_config, schema)
        if table_config.mirror and not model.key:
            raise ConfigError(
                f"table {ref} has no primary key (and none is configured)",
                f"add `primary_key: [...]` under source.tables.{ref.name}, or give the table "
                "a primary key",
            )
        for name in model.key:
            if model.column(name) is None:
                raise ConfigError(
                    f"primary key column {name} of {ref} is not a column of the table",
                    f"fix primary_key under source.tables.{ref.name}",
                )
        model.create_tables(con)
        self.key_indexes.at_load(con, model)
        model.record_version(con, None, "first seen")
        self.tables[ref] = model
        return model

    def ensure_lookup_columns(self, con: duckdb.DuckDBPyConnection) -> None:
        """Add (and fill) the hidden lookup columns whose looked-up table is known."""
        for model in self.tables.values():
            if not model.config.mirror:
                continue
            for spec in self._lookup_specs(model.ref):
                name = LookupColumn.column_name(spec)
                if name in model.lookups:
                    continue
                target = self.tables.get(TableRef.parse(spec.table))
                if target is None:
                    continue
                column = target.column(spec.column)
                if column is None:
                    continue  # reported when the rollup is planned
                lookup = LookupColumn(name, spec, target.ref)
                con.execute(
                    f"ALTER TABLE {model.mirror} ADD COLUMN IF NOT EXISTS {quote_ident(name)} "
                    f"{column.duck_type}"
                )
                model.lookups[name] = lookup
                model.lookup_types[name] = column.duck_type
                fill_lookup_column(con, model, lookup, target)

    # --------------------------------------------------------------- rollups

    def setup_rollups(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        """Plan (and create or rebuild) every rollup whose tables are known; names built."""
        self.ensure_lookup_columns(con)
        if self._settled and all(
            r.plan is not None or r.state == PAUSED for r in self.rollups.values()
        ):
            return []  # the common case, every batch: nothing to plan, no query
        stored = self._stored_rollups(con)
        built = []
        for name, runtime in self.rollups.items():
            if runtime.plan is not None or runtime.state == PAUSED:
                continue
            config = runtime.config
            fact = self.tables.get(TableRef.parse(config.table))
            targets = [
                self.tables.get(TableRef.parse(d.lookup.table))
                for d in config.dimensions
                if d.lookup is not None
            ]
            if fact is None or any(t is None for t in targets):
                continue
            dead = [t.name for t in [fact, *targets] if t is not None and t.state == DEAD]
            if dead:
                self.pause(con, name, f"table {', '.join(dead)} stopped: see headrace.dead_letters")
                continue
            definition = definition_json(config, resolved_time(config, fact))
            previous = stored.get(name)
            if (
                previous is not None
                and previous[0] == PAUSED
                and previous[2] == definition
                and previous[1] != NOT_CONFIGURED
            ):
                runtime.state, runtime.reason = PAUSED, previous[1]
                continue
            runtime.plan = RollupPlan(config, fact, fact.lookups, con)
            if (
                previous is None
                or previous[2] != definition
                or previous[0] != ACTIVE
                or not self._state_exists(con, name)
            ):
                self.build(con, name)
                built.append(name)
            else:
                runtime.state = ACTIVE
                for grain in config.grains:
                    con.execute(view_sql(runtime.plan, grain))
                self._drop_unowned(con, name, runtime.plan)
        for name in stored:
            if name not in self.rollups and stored[name][0] != PAUSED:
                self._save_rollup(
                    con,
                    name,
                    table_name="",
                    state=PAUSED,
                    reason=NOT_CONFIGURED,
                    definition=stored[name][2],
                    retained_from=None,
                    views=None,
                )
        self._settled = True
        return built

    @staticmethod
    def _state_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
        return table_exists(con, ROLLUP, f"{rollup_table_prefix(name)}state")

    def build(
        self, con: duckdb.DuckDBPyConnection, name: str, config: RollupConfig | None = None
    ) -> None:
        """(Re)compute a rollup's state from the mirror and (re)create its views."""
        config, plan = self.plan_rebuild(con, name, config)
        self.install(con, name, config, plan)

    def plan_rebuild(
        self, con: duckdb.DuckDBPyConnection, name: str, config: RollupConfig | None = None
    ) -> tuple[RollupConfig, RollupPlan]:
        """The definition a rebuild of ``name`` uses (``config``, else the current one) and
        its plan; adds the looked-up columns it needs to the mirrors."""
        runtime = self.rollups.get(name)
        if runtime is None and config is None:
            raise ConfigError(f"no rollup named {name!r}", "use a name from the pipeline file")
        definition = config or cast(RollupRuntime, runtime).config
        fact = self.tables.get(TableRef.parse(definition.table))
        if fact is None:
            raise ConfigError(
                f"rollup {name}: table {definition.table} has not been seen yet",
                "rebuild after the first snapshot",
            )
        self.ensure_lookup_columns(con)
        return definition, RollupPlan(definition, fact, fact.lookups, con)

    def install(
        self,
        con: duckdb.DuckDBPyConnection,
        name: str,
        config: RollupConfig,
        plan: RollupPlan,
        *,
        rows: Mapping[str, pa.Table] | None = None,
        touched: str | None = None,
    ) -> None:
        """Replace rollup ``name``'s tables and views by those of ``plan``: computed from
        the mirror now, or (a rebuild while streaming) filled with ``rows`` computed
        earlier, with the groups listed in table ``touched`` recomputed from the mirror."""
        runtime = self.rollups.get(name)
        if runtime is None:
            runtime = self.rollups[name] = RollupRuntime(config)
        runtime.config = config
        old_views = self._stored_rollups(con).get(name, (None, None, None, None, []))[4]
        for table in self._owned_tables(con, name):
            con.execute(f"DROP TABLE IF EXISTS {ROLLUP}.{quote_ident(table)}")
        with_horizon = runtime.retained_from is not None
        params = [runtime.retained_from] if with_horizon else []
        for table, select in plan.table_selects(with_horizon).items():
            if rows is None:
                con.execute(f"CREATE TABLE {table} AS {select(None)}", params)
                continue
            con.execute(f"CREATE TABLE {table} AS {select(None)} LIMIT 0", params)
            con.register("_hr_rebuilt", rows[table])
            try:
                con.execute(f"INSERT INTO {table} SELECT * FROM _hr_rebuilt")
            finally:
                con.unregister("_hr_rebuilt")
            if touched is not None:
                groups = ", ".join(plan.group_columns)
                con.execute(
                    f"DELETE FROM {table} t USING (SELECT DISTINCT {groups} FROM {touched}) g "
                    f"WHERE {plan.match('t', 'g')}"
                )
                con.execute(f"INSERT INTO {table} {select(touched)}", params)
        for view in old_views:
            if view not in plan.view_names():
                schema, _, view_name = view.partition(".")
                con.execute(f"DROP VIEW IF EXISTS {schema}.{quote_ident(view_name)}")
        for grain in config.grains:
            con.execute(view_sql(plan, grain))
        runtime.plan, runtime.state, runtime.reason = plan, ACTIVE, None
        runtime.appended, runtime.compacted_rows, runtime.compaction = 0, None, []
        self._save_rollup(
            con,
            name,
            table_name=plan.table.name,
            state=ACTIVE,
            reason=None,
            definition=plan.definition,
            retained_from=runtime.retained_from,
            views=plan.view_names(),
        )

    @staticmethod
    def _owned_tables(con: duckdb.DuckDBPyConnection, name: str) -> list[str]:
        """Rollup ``name``'s tables in the store (unquoted): ``<name>__state`` and its side
        tables and reserves, not those of a rollup named ``<name>__<more>``."""
        rows = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ?", [ROLLUP]
        ).fetchall()
        return [str(r[0]) for r in rows if is_rollup_table(name, str(r[0]))]

    def _drop_unowned(self, con: duckdb.DuckDBPyConnection, name: str, plan: RollupPlan) -> None:
        """Drop rollup ``name``'s tables its plan no longer uses (an approximate count
        distinct's own table, kept by stores written before it read its exact twin's)."""
        used = set(plan.owned_tables())
        for table in self._owned_tables(con, name):
            quoted = f"{ROLLUP}.{quote_ident(table)}"
            if quoted not in used:
                con.execute(f"DROP TABLE {quoted}")

    def pause(self, con: duckdb.DuckDBPyConnection, name: str, reason: str) -> None:
        """Stop maintaining a rollup (its views keep the last state), with the reason."""
        runtime = self.rollups[name]
        if runtime.state == PAUSED:
            return
        log.warning("rollup %s paused: %s", name, reason)
        definition = (
            runtime.plan.definition
            if runtime.plan is not None
            else self._definition_or_empty(runtime)
        )
        runtime.plan, runtime.state, runtime.reason = None, PAUSED, reason
        con.execute(
            f"""UPDATE {META}.rollups SET state = ?, reason = ?, updated_at = now()
                WHERE name = ?""",
            [PAUSED, reason, name],
        )
        exists = con.execute(
            f"SELECT count(*) FROM {META}.rollups WHERE name = ?", [name]
        ).fetchall()
        if not exists[0][0]:
            self._save_rollup(
                con,
                name,
                table_name=runtime.config.table,
                state=PAUSED,
                reason=reason,
                definition=definition,
                retained_from=None,
                views=[],
            )

    def _definition_or_empty(self, runtime: RollupRuntime) -> str:
        fact = self.tables.get(TableRef.parse(runtime.config.table))
        if fact is None:
            return "{}"
        return definition_json(runtime.config, resolved_time(runtime.config, fact))

    @staticmethod
    def _save_rollup(
        con: duckdb.DuckDBPyConnection,
        name: str,
        *,
        table_name: str,
        state: str,
        reason: str | None,
        definition: str,
        retained_from: datetime | None,
        views: list[str] | None,
    ) -> None:
        con.execute(
            f"""INSERT INTO {META}.rollups VALUES (?, ?, ?, ?, ?, now(), ?, ?)
            ON CONFLICT (name) DO UPDATE SET state = excluded.state, reason = excluded.reason,
                definition = excluded.definition, updated_at = excluded.updated_at,
                retained_from = excluded.retained_from,
                views = coalesce(excluded.views, rollups.views),
                table_name = CASE WHEN excluded.table_name = '' THEN rollups.table_name
                                  ELSE excluded.table_name END""",
            [
                name,
                table_name,
                state,
                reason,
                definition,
                retained_from,
                None if views is None else json.dumps(views),
            ],
        )

    # ------------------------------------------------------------ dependents

    def rollups_reading(self, ref: TableRef, columns: set[str]) -> list[str]:
        """Active rollups whose table is ``ref`` and that read any of ``columns``."""
        out = []
        for name, runtime in self.rollups.items():
            plan = runtime.plan
            if plan is None or not runtime.active:
                continue
            if (plan.table.ref == ref and plan.columns & columns) or any(
                t == ref and c in columns for t, c in plan.lookup_deps
            ):
                out.append(name)
        return out

    def rollups_on(self, ref: TableRef) -> list[str]:
        """Rollups (any state but paused) whose table or a looked-up table is ``ref``."""
        out = []
        for name, runtime in self.rollups.items():
            if runtime.state == PAUSED:
                continue
            config = runtime.config
            tables = {TableRef.parse(config.table)} | {
                TableRef.parse(d.lookup.table) for d in config.dimensions if d.lookup is not None
            }
            if ref in tables:
                out.append(name)
        return out

    def lookup_columns_on(self, target: TableRef, column: str) -> list[tuple[TableModel, str]]:
        """(fact model, hidden column) of every lookup reading ``target.column``."""
        out = []
        for model in self.tables.values():
            for name, lookup in model.lookups.items():
                if lookup.target == target and lookup.spec.column == column:
                    out.append((model, name))
        return out

    def hidden_lookup_prefix(self) -> str:
        return LOOKUP_PREFIX
