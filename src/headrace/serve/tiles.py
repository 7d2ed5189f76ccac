"""Dashboards and tiles as configured: a tile is a named query with a chart type.

A tile query is plain DuckDB SQL over the store with three kinds of holes,
all filled safely by :func:`render_tile_query`:

- ``$from`` and ``$to``: bound parameters (TIMESTAMPTZ) of the selected time range;
- ``{filters}``: replaced by ``("dim" = $f_dim AND ...)`` for each active
  dimension filter the tile accepts, or ``TRUE`` when there is none. Only
  configured dimension column names are interpolated (checked identifiers);
  the values are bound parameters. ``{filters:t}`` qualifies the columns
  with the alias ``t``.

Example (YAML)::

    dashboards:
      - name: overview
        title: Payments
        dimension_source: rollup.tx_volume_5m
        dimensions: [{name: currency}, {name: channel}]
        tiles:
          - name: volume
            title: Volume per 5 minutes
            chart: timeseries
            query: >
              SELECT bucket, sum(amount_sum) AS volume FROM rollup.tx_volume_5m
              WHERE bucket >= $from AND bucket < $to AND {filters} GROUP BY 1 ORDER BY 1
            drill: {table: mirror.transactions, time_column: created_at}
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUALIFIED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
_FILTERS_HOLE = re.compile(r"\{filters(?::([A-Za-z_][A-Za-z0-9_]*))?\}")

RELATIVE_RANGES: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}


def quote_ident(name: str) -> str:
    """Quote a checked identifier for DuckDB."""
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(name: str) -> str:
    """Quote ``schema.table`` for DuckDB."""
    schema, _, table = name.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(table)}"


class ChartType(StrEnum):
    """How a tile's rows are drawn."""

    STAT = "stat"  # first row, first numeric column, as one big number
    TIMESERIES = "timeseries"  # first column time, the other numeric columns are series
    BAR = "bar"  # first column label, second column value
    TABLE = "table"  # rows as a table
    ALERTS = "alerts"  # a live feed of rows (newest first)


class Dimension(BaseModel):
    """A dimension users can filter on; applies to every tile that accepts it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Identifier used in URLs and as the filter's key.")
    label: str = Field(default="", description="Shown in the UI; default: the name.")
    column: str = Field(default="", description="Column the filter compares; default: the name.")

    @model_validator(mode="after")
    def _defaults(self) -> Dimension:
        for value in (self.name, self.column or self.name):
            if not IDENTIFIER.match(value):
                raise ValueError(f"dimension name/column must be an identifier: {value!r}")
        if not self.label:
            self.label = self.name.replace("_", " ")
        if not self.column:
            self.column = self.name
        return self


class Drill(BaseModel):
    """Where the rows behind a chart point live."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="schema.table holding the rows, e.g. mirror.transactions.")
    time_column: str = Field(description="Event-time column bucketed by the chart.")
    grain_s: int = Field(default=300, gt=0, description="Bucket width in seconds (5 minutes).")
    limit: int = Field(default=500, gt=0, le=10_000, description="Rows shown at most.")
    order_by: str = Field(default="", description="Column to sort by (descending); default: time.")
    dimension_columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column of the drill table for each dimension, when it differs from the "
        "dimension's column; dimensions the table lacks are not applied (and reported).",
    )

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        if not QUALIFIED.match(value):
            raise ValueError(f"drill table must be schema.table: {value!r}")
        return value

    @field_validator("time_column", "order_by")
    @classmethod
    def _ident(cls, value: str) -> str:
        if value and not IDENTIFIER.match(value):
            raise ValueError(f"not an identifier: {value!r}")
        return value

    @field_validator("dimension_columns")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        for column in value.values():
            if not IDENTIFIER.match(column):
                raise ValueError(f"not an identifier: {column!r}")
        return value


class Tile(BaseModel):
    """A named query with a chart type."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Identifier, unique in its dashboard.")
    title: str = Field(default="", description="Shown above the tile; default: the name.")
    chart: ChartType = Field(default=ChartType.TABLE, description="How the rows are drawn.")
    query: str = Field(description="DuckDB SQL with $from, $to and {filters} holes.")
    dimensions: list[str] | None = Field(
        default=None,
        description="Dimension filters this tile accepts; None: all of the dashboard's.",
    )
    drill: Drill | None = Field(default=None, description="Drill-down from a point to its rows.")
    unit: str = Field(default="", description="Unit shown next to values.")
    width: int = Field(default=1, ge=1, le=4, description="Grid columns the tile spans.")

    @model_validator(mode="after")
    def _check(self) -> Tile:
        if not IDENTIFIER.match(self.name):
            raise ValueError(f"tile name must be an identifier: {self.name!r}")
        if not self.title:
            self.title = self.name.replace("_", " ")
        return self


class Dashboard(BaseModel):
    """A page of tiles sharing a time range and dimension filters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Identifier used in URLs.")
    title: str = Field(default="", description="Shown as the page title.")
    dimensions: list[Dimension] = Field(default_factory=list, description="Filterable dims.")
    dimension_source: str = Field(
        default="", description="schema.table/view listing dimension values for the filter pickers."
    )
    tiles: list[Tile] = Field(default_factory=list, description="The tiles, in order.")
    account_table: str = Field(
        default="",
        description="Optional mirror table of accounts (enables the account page links).",
    )

    @model_validator(mode="after")
    def _check(self) -> Dashboard:
        if not IDENTIFIER.match(self.name):
            raise ValueError(f"dashboard name must be an identifier: {self.name!r}")
        if self.dimension_source and not QUALIFIED.match(self.dimension_source):
            raise ValueError(f"dimension_source must be schema.table: {self.dimension_source!r}")
        names = [t.name for t in self.tiles]
        if len(names) != len(set(names)):
            raise ValueError(f"tile names repeat in dashboard {self.name!r}")
        known = {d.name for d in self.dimensions}
        for tile in self.tiles:
            unknown = set(tile.dimensions or ()) - known
            if unknown:
                raise ValueError(f"tile {tile.name!r} names unknown dimensions {sorted(unknown)}")
        if not self.title:
            self.title = self.name.replace("_", " ")
        return self

    def tile(self, name: str) -> Tile | None:
        """The tile called ``name``."""
        return next((t for t in self.tiles if t.name == name), None)

    def dimension(self, name: str) -> Dimension | None:
        """The dimension called ``name``."""
        return next((d for d in self.dimensions if d.name == name), None)


class TimeRange(BaseModel):
    """A relative (``1h``) or absolute (``custom``) time range."""

    model_config = ConfigDict(frozen=True)

    spec: str
    start: datetime | None = None
    end: datetime | None = None

    @classmethod
    def parse(cls, spec: str | None, start: str | None = None, end: str | None = None) -> TimeRange:
        """``spec`` in :data:`RELATIVE_RANGES` or ``custom`` with ISO ``start``/``end``."""
        spec = spec or "1h"
        if spec in RELATIVE_RANGES:
            return cls(spec=spec)
        if spec != "custom":
            raise ValueError(f"range must be one of {[*RELATIVE_RANGES, 'custom']}, not {spec!r}")
        if not start or not end:
            raise ValueError("a custom range needs both 'from' and 'to' (ISO 8601)")
        lo, hi = _aware(datetime.fromisoformat(start)), _aware(datetime.fromisoformat(end))
        if hi <= lo:
            raise ValueError("'to' must be after 'from'")
        return cls(spec="custom", start=lo, end=hi)

    def bounds(self, now: datetime | None = None) -> tuple[datetime, datetime]:
        """The concrete ``[from, to)`` at ``now``."""
        if self.start is not None and self.end is not None:
            return self.start, self.end
        now = now or datetime.now(UTC)
        return now - RELATIVE_RANGES[self.spec], now + timedelta(minutes=5)

    @property
    def key(self) -> str:
        """Stable text identifying this range (part of a live view's key)."""
        if self.start is None or self.end is None:
            return self.spec
        return f"custom:{self.start.isoformat()}..{self.end.isoformat()}"


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def render_tile_query(
    dashboard: Dashboard,
    tile: Tile,
    filters: dict[str, str],
    bounds: tuple[datetime, datetime],
) -> tuple[str, dict[str, Any], list[str]]:
    """Fill a tile's holes; returns (sql, named parameters, filters not applied)."""
    accepted = (
        set(tile.dimensions)
        if tile.dimensions is not None
        else {d.name for d in dashboard.dimensions}
    )
    params: dict[str, Any] = {}
    applied: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name, value in sorted(filters.items()):
        dim = dashboard.dimension(name)
        if dim is None or name not in accepted or not _FILTERS_HOLE.search(tile.query):
            ignored.append(name)
            continue
        applied.append((dim.column, f"f_{name}"))
        params[f"f_{name}"] = value

    def fill(match: re.Match[str]) -> str:
        if not applied:
            return "TRUE"
        prefix = f"{quote_ident(match.group(1))}." if match.group(1) else ""
        return "(" + " AND ".join(f"{prefix}{quote_ident(c)} = ${p}" for c, p in applied) + ")"

    sql = _FILTERS_HOLE.sub(fill, tile.query)
    if re.search(r"\$from\b", sql):
        params["from"] = bounds[0]
    if re.search(r"\$to\b", sql):
        params["to"] = bounds[1]
    return sql, params, ignored


def default_dashboards() -> list[Dashboard]:
    """What a store without configured dashboards shows: freshness and alerts."""
    return [
        Dashboard(
            name="overview",
            title="Store overview",
            tiles=[
                Tile(
                    name="tables",
                    title="Tables and freshness",
                    chart=ChartType.TABLE,
                    width=2,
                    query="SELECT table_name, rows, last_commit_ts, "
                    "round(epoch(now() - last_commit_ts), 1) AS lag_s "
                    "FROM headrace.tables ORDER BY table_name",
                ),
                Tile(
                    name="alerts",
                    title="Alerts",
                    chart=ChartType.ALERTS,
                    width=2,
                    query="SELECT detected_at, severity, rule, account_id, key "
                    "FROM headrace.alerts WHERE detected_at >= $from "
                    "ORDER BY detected_at DESC LIMIT 50",
                ),
            ],
        )
    ]
