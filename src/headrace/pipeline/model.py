"""The pipeline definition users write in ``headrace.yaml``, as typed models.

Every field carries its documentation (``Field(description=...)``); the
models forbid unknown keys so a typo is an error, not a silently ignored
setting. Loading and the checks that span several fields live in
:mod:`headrace.pipeline.load`.

A minimal file::

    source:
      dsn_env: HEADRACE_DSN
      tables:
        accounts: {}
        transactions:
          event_time: created_at
    rollups:
      - name: tx_volume
        table: transactions
        grain: 5m
        coarser: [1h, 1d]
        dimensions:
          - status
          - name: tier
            lookup: {table: accounts, on: account_id, column: tier}
        measures:
          - {name: tx_count, fn: count}
          - {name: volume, fn: sum, column: amount}
          - {name: declined, fn: count, where: "status = 'declined'"}
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from headrace.alerts.config import MetricAlertConfig, SinkConfig
from headrace.pipeline.durations import Duration
from headrace.rules.config import RulesConfig
from headrace.scores.config import ScoresConfig
from headrace.source.changes import TableRef

COMMIT_TIME = "commit"
"""``event_time: commit`` (the default): a row's event time is its insert's commit time."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableConfig(_Model):
    """What headrace keeps for one source table."""

    primary_key: list[str] | None = Field(
        default=None,
        description=(
            "Columns identifying a row. When absent, read from the PostgreSQL catalog "
            "(the table's primary key / replica identity)."
        ),
    )
    event_time: str = Field(
        default=COMMIT_TIME,
        description=(
            "Column holding the row's event time (timestamp, timestamptz or date), used by "
            "rollups that do not name their own time column. `commit` (the default) uses the "
            "commit time of the transaction that inserted the row, kept through updates; rows "
            "copied by the initial snapshot take the snapshot's time."
        ),
    )
    mirror: bool = Field(
        default=True,
        description=(
            "Keep the table's current rows in `mirror.<table>`. Rollups and looked-up "
            "dimensions need it (updates and deletes retract the old row read from the mirror)."
        ),
    )
    history: bool = Field(
        default=False,
        description="Append every change (insert, update, delete, truncate) to `history.<table>`.",
    )
    retention: Duration | None = Field(
        default=None,
        description="Drop history rows whose commit time is older than this (e.g. `90d`).",
    )


def _plain_column(value: object) -> object:
    """A dimension written as a bare string is a column of the rollup's table."""
    if isinstance(value, str):
        return {"name": value, "column": value}
    return value


def _key_index_mode(value: object) -> object:
    """``auto``, ``true`` or ``false`` (YAML's other spellings of a boolean included), with
    one error for anything else instead of one per member of the union."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _KEY_INDEX_WORDS:
        return _KEY_INDEX_WORDS[value.lower()]
    raise ValueError(f"should be auto, true or false, not {value!r}")


_KEY_INDEX_WORDS: dict[str, bool | str] = {
    "auto": "auto",
    "true": True,
    "false": False,
    "on": True,
    "off": False,
    "yes": True,
    "no": False,
}

KeyIndexMode = Annotated[bool | Literal["auto"], BeforeValidator(_key_index_mode)]
"""``store.mirror_key_index``'s values."""


class LookupConfig(_Model):
    """A dimension read from another mirrored table (e.g. the account's tier).

    The value is resolved when a row version of the rollup's table is applied
    (insert or update), against the looked-up table as of that change in
    commit order, and recorded with the row: later changes of the looked-up
    row do not move rows already counted; the row's next update picks up the
    new value.
    """

    table: str = Field(description="The looked-up table (must be a mirrored source table).")
    on: list[str] = Field(
        description=(
            "Columns of the rollup's table matched, in order, to the looked-up table's "
            "primary key (one name or a list)."
        ),
    )
    column: str = Field(description="Column of the looked-up table whose value is the dimension.")

    @field_validator("on", mode="before")
    @classmethod
    def _on_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class DimensionConfig(_Model):
    """One dimension of a rollup: exactly one of `column`, `expr`, `lookup`."""

    name: str = Field(description="Name of the dimension column in the rollup views.")
    column: str | None = Field(default=None, description="A column of the rollup's table.")
    expr: str | None = Field(
        default=None,
        description=(
            "A DuckDB SQL expression over the row's columns, e.g. `date_part('hour', created_at)`."
        ),
    )
    lookup: LookupConfig | None = Field(
        default=None, description="A value looked up in another mirrored table."
    )


Dimension = Annotated[DimensionConfig, BeforeValidator(_plain_column)]


class MeasureFn(StrEnum):
    """The aggregate functions a rollup measure can use."""

    COUNT = "count"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    AVG = "avg"
    COUNT_DISTINCT = "count_distinct"
    APPROX_COUNT_DISTINCT = "approx_count_distinct"


class MeasureConfig(_Model):
    """One measure of a rollup, e.g. ``{name: declined, fn: sum, column: amount, where: ...}``."""

    name: str = Field(description="Name of the measure column in the rollup views.")
    fn: MeasureFn = Field(
        description=(
            "count (rows, or non-NULL values of `column`/`expr`), sum, min, max, avg, "
            "count_distinct (exact), approx_count_distinct (HyperLogLog, ~1.6% error; beside a "
            "count_distinct of the same value and `where` it reads that one's values and costs "
            "nothing more to maintain)."
        ),
    )
    column: str | None = Field(
        default=None, description="The column aggregated (not needed for a row count)."
    )
    expr: str | None = Field(
        default=None,
        description="Instead of `column`: a DuckDB SQL expression over the row's columns.",
    )
    where: str | None = Field(
        default=None,
        description=(
            "Only rows where this DuckDB SQL condition is true count, e.g. `status = 'declined'`."
        ),
    )

    @property
    def value_sql(self) -> str | None:
        """The aggregated value as SQL (quoted column or the expression), if any."""
        if self.column is not None:
            return quote_ident(self.column)
        return self.expr


class RollupConfig(_Model):
    """A time-bucketed aggregate over one table, maintained incrementally."""

    name: str = Field(
        description=(
            "Identifier (lowercase letters, digits, _): the views are `rollup.<name>_<grain>`."
        ),
    )
    table: str = Field(description="The source table aggregated (a key of `source.tables`).")
    time: str | None = Field(
        default=None,
        description=(
            "Column whose value places a row in a bucket (timestamp, timestamptz or date), or "
            "`commit` when the table's `event_time` is `commit`. Default: the table's `event_time`."
        ),
    )
    grain: Duration = Field(description="Bucket width of the maintained state, e.g. `5m`.")
    coarser: list[Duration] = Field(
        default_factory=list,
        description=(
            "Coarser grains served from the same state at query time, e.g. `[1h, 1d]`; "
            "each a multiple of `grain`."
        ),
    )
    dimensions: list[Dimension] = Field(
        default_factory=list, description="Group-by dimensions besides the time bucket."
    )
    measures: list[MeasureConfig] = Field(
        min_length=1, description="The aggregates computed per bucket and dimension values."
    )
    retention: Duration | None = Field(
        default=None,
        description=(
            "Drop buckets older than this (aligned to the coarsest grain); changes to rows in "
            "dropped buckets are ignored from then on."
        ),
    )

    @property
    def grains(self) -> list[Duration]:
        """The base grain followed by the coarser ones."""
        return [self.grain, *self.coarser]


class SourceConfig(_Model):
    """The PostgreSQL database changes come from."""

    name: str = Field(
        default="postgres",
        description="Name of this source in the store (`headrace.position.source`).",
    )
    dsn: str | None = Field(
        default=None,
        description="libpq connection string or URI, e.g. `postgresql://user@host/db`.",
    )
    dsn_env: str | None = Field(
        default=None, description="Name of an environment variable holding the DSN."
    )
    publication: str = Field(default="headrace", description="Publication to create or use.")
    slot: str = Field(default="headrace", description="Logical replication slot to create or use.")
    tables: dict[str, TableConfig] = Field(
        min_length=1,
        description="Tables to capture, keyed by `schema.table` (or `table` for schema public).",
    )

    def resolved_dsn(self) -> str | None:
        """The DSN, read from the environment when `dsn_env` is set."""
        if self.dsn is not None:
            return self.dsn
        if self.dsn_env is not None:
            return os.environ.get(self.dsn_env)
        return None


_SIZE = re.compile(r"(?i)^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
"""A memory size as DuckDB's ``memory_limit`` takes it."""


class StoreConfig(_Model):
    """Where the analytical store lives."""

    path: str = Field(
        default="headrace.duckdb",
        description="DuckDB database file (relative paths are relative to the config file).",
    )
    checkpoint_interval: Duration = Field(
        default=timedelta(seconds=60),
        description="Run CHECKPOINT at least this often while batches are applied.",
    )
    checkpoint_wal_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Run CHECKPOINT as soon as the write-ahead log grows beyond this many bytes.",
    )
    row_group_size: int = Field(
        default=16_384,
        ge=2048,
        multiple_of=2048,
        description=(
            "Rows per DuckDB row group written by the pipeline (DuckDB's own default is "
            "122,880; a multiple of 2,048). A transaction that appends at least this many "
            "rows to a table writes them compressed to the file at once and logs only where "
            "they are, instead of copying them into the write-ahead log and compressing them "
            "again at the next checkpoint, which stops every commit meanwhile. Smaller groups "
            "let the batches of a high change rate take that path (measured at 100,000 "
            "changes/s: 10x less checkpoint time); the cost is a few more groups to scan."
        ),
    )
    mirror_key_index: KeyIndexMode = Field(
        default="auto",
        description=(
            "Keep an index on a mirror's key (when it is one integer column), so that a "
            "batch of few changed keys (at most one per 2,500 rows of the mirror: 800 over "
            "2M rows, 2,000 over 5M, 4,000 at most) finds their current rows through it "
            "instead of scanning the whole mirror. It pays for tables of millions of rows "
            "whose old rows are updated or deleted at random at moderate rates: measured at "
            "10,000 "
            "changes/s over 5M rows, freshness p50 83-128 instead of 176-251 ms and p99 "
            "261-373 instead of 395-565 ms. Every write pays for it: 28% more CPU a batch at "
            "100,000 changes/s (whose batches are too large to use it), longer checkpoints, "
            "and memory for the index. `auto` (the default) builds it after the snapshot on "
            "a mirror of at least `mirror_key_index_rows` rows and keeps it while at least "
            "half of the table's batches can use it, judged every 10 s: dropped while a "
            "backlog or a high rate makes the batches large or when the table only gets "
            "inserts, built again (about 0.13 s a million rows, a pause of the writer) when "
            "small batches return. `true` keeps it on every integer-keyed mirror, `false` on "
            "none (dropped at the next start)."
        ),
    )
    mirror_key_index_rows: int = Field(
        default=2_000_000,
        ge=0,
        description=(
            "With `mirror_key_index: auto`, the fewest rows a mirror has before its key is "
            "indexed. Below a million or two rows, DuckDB skips enough of the mirror by the "
            "keys' range that the index does not pay for its writes (measured live at "
            "10,000 changes/s over 1M rows: within the noise)."
        ),
    )
    streaming_threads: int = Field(
        default=1,
        ge=0,
        description=(
            "DuckDB threads while changes stream (for the writer and the reads served "
            "meanwhile); 0 means DuckDB's default, one per core. A streamed batch is many "
            "small statements: on one thread each runs where it is called, instead of waking "
            "workers that PostgreSQL and the dashboard need (measured on 2 cores: about 25% "
            "less CPU per fintech batch). The initial snapshot always uses every core."
        ),
    )
    parallel_batch_changes: int = Field(
        default=20_000,
        ge=0,
        description=(
            "A batch of at least this many changes (a backlog, a rate of tens of thousands "
            "a second, a large transaction) is applied with DuckDB on every core; smaller "
            "ones on `streaming_threads`. Large statements gain from more threads where small "
            "ones lose (measured on 2 cores at 100,000 changes/s: freshness p99 1.55-1.78 s "
            "against 2.45-2.75 s). 0: always `streaming_threads`."
        ),
    )
    memory_limit: str | None = Field(
        default=None,
        description=(
            "DuckDB's memory limit for the store while the pipeline runs, e.g. '2GB'. "
            "Beyond it DuckDB spills to a temporary directory beside the store. A source "
            "transaction is stored in one store transaction, which DuckDB holds until it "
            "commits (about 0.5 KB a change): set this when headrace shares a machine, so "
            "a bulk UPDATE of many millions of rows spills instead of taking the memory. "
            "Default: DuckDB's own (80% of the machine's memory). With `headrace run "
            "--serve`, `serve.sql.memory_limit`, when set, replaces it."
        ),
    )

    @field_validator("memory_limit")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None and not _SIZE.match(value):
            raise ValueError(f"not a size: {value!r} (e.g. 512MB, 2GB, 4GiB)")
        return value


class PipelineConfig(_Model):
    """The whole ``headrace.yaml``."""

    source: SourceConfig = Field(description="The PostgreSQL source.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The analytical store.")
    rollups: list[RollupConfig] = Field(
        default_factory=list, description="Time-bucketed aggregates maintained incrementally."
    )
    rules: RulesConfig | None = Field(
        default=None, description="Fraud rules (headrace.rules.config): each runs when present."
    )
    scores: ScoresConfig | None = Field(
        default=None, description="Per-account scores (headrace.scores.config)."
    )
    metric_alerts: list[MetricAlertConfig] = Field(
        default_factory=list, description="Alerts on rollups (headrace.alerts.config)."
    )
    sinks: list[SinkConfig] = Field(
        default_factory=list, description="Where alerts are delivered (headrace.alerts.config)."
    )
    serve: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Serving settings: dashboards and tiles, users, SQL limits "
            "(headrace.serve.settings.ServeSettings, checked when serving starts); read by "
            "`headrace run --serve` and `headrace serve`."
        ),
    )

    @property
    def table_refs(self) -> dict[TableRef, TableConfig]:
        """The configured tables by reference (``public`` schema when none is written).

        A plain property: a cached one would survive ``model_copy(update=...)``.
        """
        return {TableRef.parse(name): config for name, config in self.source.tables.items()}

    def table(self, name: str) -> tuple[TableRef, TableConfig]:
        """The configured table named ``name`` (``t`` or ``schema.t``)."""
        ref = TableRef.parse(name)
        return ref, self.table_refs[ref]

    def rollup(self, name: str) -> RollupConfig:
        """The rollup named ``name``."""
        for rollup in self.rollups:
            if rollup.name == name:
                return rollup
        raise KeyError(name)


def quote_ident(name: str) -> str:
    """Quote an SQL identifier for DuckDB (and PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote an SQL string literal for DuckDB (and PostgreSQL)."""
    return "'" + text.replace("'", "''") + "'"
