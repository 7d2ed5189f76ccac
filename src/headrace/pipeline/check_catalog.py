"""Checks of a pipeline against the tables' real columns (catalog or stream schema).

Split from :mod:`headrace.pipeline.load`, which checks a file on its own; these need
to know what columns the source tables have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psycopg

from headrace.errors import SourceError
from headrace.pipeline.catalog import TableCatalog, read_table_catalog
from headrace.pipeline.expressions import ExpressionError, unknown_columns
from headrace.pipeline.load import Path_, Problem, raise_problems
from headrace.pipeline.model import (
    COMMIT_TIME,
    LookupConfig,
    PipelineConfig,
    RollupConfig,
)
from headrace.source.changes import TableRef


def raise_source_problems(
    conn: psycopg.Connection[tuple[object, ...]], config: PipelineConfig, file: str
) -> None:
    """Read every configured table's columns from the source and raise one
    :class:`~headrace.errors.ConfigError` listing every problem :func:`check_against_catalog`
    finds (a missing table is one of them), with ``file`` named in each."""
    catalogs: dict[TableRef, TableCatalog] = {}
    for ref in config.table_refs:
        try:
            catalogs[ref] = read_table_catalog(conn, ref)
        except SourceError:
            continue  # reported as a missing table
    raise_problems(check_against_catalog(config, catalogs), file)


def check_against_catalog(
    config: PipelineConfig,
    catalogs: Mapping[TableRef, TableCatalog],
    *,
    rollups: Sequence[RollupConfig] | None = None,
) -> list[Problem]:
    """Problems found by comparing ``config`` with the tables' real columns.

    Tables missing from ``catalogs`` are reported as missing. Pass
    ``rollups`` to check only those rollups (and no table settings).
    """
    problems: list[Problem] = []
    if rollups is None:
        for name, table in config.source.tables.items():
            path: Path_ = ("source", "tables", name)
            catalog = catalogs.get(TableRef.parse(name))
            if catalog is None:
                problems.append(Problem(path, f"table {name} does not exist in the source"))
                continue
            known = ", ".join(catalog.columns)
            for column in table.primary_key or ():
                if column not in catalog.columns:
                    problems.append(Problem((*path, "primary_key"), f"no column {column!r}", known))
            if table.primary_key is None and not catalog.primary_key and table.mirror:
                problems.append(
                    Problem(
                        (*path, "primary_key"),
                        f"{name} has no primary key or replica identity index",
                        "list the columns identifying a row in primary_key",
                    )
                )
            if table.event_time != COMMIT_TIME:
                problems.extend(
                    _check_time_column(catalog, table.event_time, (*path, "event_time"))
                )
    for index, rollup in enumerate(config.rollups):
        if rollups is not None and rollup not in rollups:
            continue
        problems.extend(_check_rollup_columns(config, rollup, ("rollups", index), catalogs))
    return problems


def _check_time_column(catalog: TableCatalog, column: str, path: Path_) -> list[Problem]:
    if column not in catalog.columns:
        return [
            Problem(path, f"{catalog.table} has no column {column!r}", ", ".join(catalog.columns))
        ]
    if column not in catalog.time_columns:
        return [
            Problem(
                path,
                f"{column} is {catalog.columns[column]}, not a time",
                "a timestamp, timestamptz or date column (or `commit`)",
            )
        ]
    return []


def _check_rollup_columns(
    config: PipelineConfig,
    rollup: RollupConfig,
    path: Path_,
    catalogs: Mapping[TableRef, TableCatalog],
) -> list[Problem]:
    ref, table = config.table(rollup.table)
    catalog = catalogs.get(ref)
    if catalog is None:
        return [Problem((*path, "table"), f"table {rollup.table} does not exist in the source")]
    problems: list[Problem] = []
    known = set(catalog.columns)
    allowed = ", ".join(catalog.columns)
    time = rollup.time or table.event_time
    if time != COMMIT_TIME:
        problems.extend(_check_time_column(catalog, time, (*path, "time")))

    def columns_of(sql: str, where: Path_) -> None:
        try:
            missing = unknown_columns(sql, known)
        except ExpressionError:
            return  # already reported by check_pipeline
        problems.extend(
            Problem(where, f"no column {m!r} in {rollup.table}", allowed) for m in missing
        )

    for index, dimension in enumerate(rollup.dimensions):
        dpath: Path_ = (*path, "dimensions", index)
        if dimension.column is not None and dimension.column not in known:
            problems.append(
                Problem(
                    (*dpath, "column"), f"no column {dimension.column!r} in {rollup.table}", allowed
                )
            )
        if dimension.expr is not None:
            columns_of(dimension.expr, (*dpath, "expr"))
        if dimension.lookup is not None:
            problems.extend(
                _check_lookup(
                    config,
                    rollup,
                    dimension.lookup,
                    path=(*dpath, "lookup"),
                    catalog=catalog,
                    catalogs=catalogs,
                )
            )
    for index, measure in enumerate(rollup.measures):
        mpath: Path_ = (*path, "measures", index)
        if measure.column is not None and measure.column not in known:
            problems.append(
                Problem(
                    (*mpath, "column"), f"no column {measure.column!r} in {rollup.table}", allowed
                )
            )
        if measure.expr is not None:
            columns_of(measure.expr, (*mpath, "expr"))
        if measure.where is not None:
            columns_of(measure.where, (*mpath, "where"))
    return problems


def _check_lookup(
    config: PipelineConfig,
    rollup: RollupConfig,
    lookup: LookupConfig,
    *,
    path: Path_,
    catalog: TableCatalog,
    catalogs: Mapping[TableRef, TableCatalog],
) -> list[Problem]:
    problems = [
        Problem(
            (*path, "on"), f"no column {column!r} in {rollup.table}", ", ".join(catalog.columns)
        )
        for column in lookup.on
        if column not in catalog.columns
    ]
    target = catalogs.get(TableRef.parse(lookup.table))
    if target is None:
        return problems
    target_key = config.table_refs[target.table].primary_key or list(target.primary_key)
    if len(target_key) != len(lookup.on):
        problems.append(
            Problem(
                (*path, "on"),
                f"{len(lookup.on)} column(s) for the {len(target_key)}-column key "
                f"({', '.join(target_key)}) of {lookup.table}",
                f"{len(target_key)} column(s) of {rollup.table}",
            )
        )
    if lookup.column not in target.columns:
        problems.append(
            Problem(
                (*path, "column"),
                f"no column {lookup.column!r} in {lookup.table}",
                ", ".join(target.columns),
            )
        )
    return problems


# ----------------------------------------------------------------------------
# pydantic errors → problems
