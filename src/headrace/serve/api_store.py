"""Store contents routes: table freshness, mirror rows (search, by key), rollup rows."""

from __future__ import annotations

from typing import Any

import duckdb
from starlette.requests import Request
from starlette.responses import Response

from headrace.pipeline.durations import ALLOWED, parse_duration
from headrace.serve.api_reads import (
    FILTER_PARAM,
    MAX_FILTER_VALUE,
    RANGE_PARAMS,
    get_route,
    prefixed_filters,
    read_catalog,
    read_table,
    time_range,
    typed_filters,
)
from headrace.serve.catalog import Catalog, MaskPolicy, Relation
from headrace.serve.http import ApiError, int_param, json_response
from headrace.serve.openapi import ApiRoute, Param
from headrace.serve.results import json_value, table_to_json
from headrace.serve.state import ServeState, state
from headrace.serve.store import position_status
from headrace.serve.tiles import quote_ident, quote_qualified
from headrace.store.duckdb.schema import grain_label

_AGGREGATES = frozenset({"sum", "min", "max", "avg", "count"})


async def tables(request: Request) -> Response:
    st = state(request)
    st.auth.require(request)
    catalog = await read_catalog(st)
    result: dict[str, Any] = {"tables": [], "rollups": []}
    result["position"] = await st.reader.call(position_status)
    if catalog.has("headrace.tables"):
        table = await read_table(
            st,
            "SELECT *, epoch(now() - last_commit_ts) AS freshness_s FROM headrace.tables "
            "ORDER BY table_name",
            None,
            MaskPolicy(),
        )
        result["tables"] = table.to_pylist()
    if catalog.has("headrace.rollups"):
        table = await read_table(
            st,
            "SELECT name, state, reason, updated_at FROM headrace.rollups ORDER BY name",
            None,
            MaskPolicy(),
        )
        result["rollups"] = table.to_pylist()
    return json_response(json_value(result))


# mirror rows -------------------------------------------------------------------


async def _mirrored_table(st: ServeState, request: Request) -> Relation:
    """The mirrored table the path names, or a 404."""
    catalog = await read_catalog(st)
    name = request.path_params["table"]
    relation = catalog.get("mirror", name)
    if relation is None:
        raise ApiError(404, f"no mirrored table {name!r}", "see GET /api/schema")
    return relation


async def rows(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    relation = await _mirrored_table(st, request)
    limit = int_param(request, "limit", 100, 1, 1000)
    reserved = {"limit", "q", "order"}
    filters = {k: v for k, v in request.query_params.items() if k not in reserved}
    params: dict[str, Any] = {}
    conditions = typed_filters(relation, policy, filters, params)
    search = request.query_params.get("q")
    if search:
        if len(search) > MAX_FILTER_VALUE:
            raise ApiError(400, f"'q' must be at most {MAX_FILTER_VALUE} characters")
        masked = set(policy.masked_columns(relation))
        text_columns = [
            c for c, t in relation.columns if t.upper().startswith("VARCHAR") and c not in masked
        ]
        if text_columns:
            params["q"] = f"%{search}%"
            conditions.append(
                "(" + " OR ".join(f"{quote_ident(c)} ILIKE $q" for c in text_columns) + ")"
            )
        else:
            conditions.append("FALSE")
    order = request.query_params.get("order", "")
    order_sql = ""
    if order:
        column = order.lstrip("-")
        if column not in dict(relation.columns):
            raise ApiError(400, f"cannot order by unknown column {column!r}")
        order_sql = f" ORDER BY {quote_ident(column)} {'DESC' if order.startswith('-') else 'ASC'}"
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = f"SELECT * FROM {quote_qualified(relation.qualified)}{where}{order_sql} LIMIT {limit}"
    table = await read_table(st, sql, params, policy)
    return json_response({"table": relation.qualified, **table_to_json(table)})


def _key_columns(cur: duckdb.DuckDBPyConnection, relation: Relation) -> list[str]:
    row = cur.execute(
        "SELECT constraint_column_names FROM duckdb_constraints() WHERE schema_name = ? "
        "AND table_name = ? AND constraint_type = 'PRIMARY KEY' "
        "AND database_name = current_database()",
        [relation.schema, relation.name],
    ).fetchall()
    return list(row[0][0]) if row else []


async def row_by_key(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    relation = await _mirrored_table(st, request)
    keys = await st.reader.call(lambda cur: _key_columns(cur, relation))
    if not keys:
        raise ApiError(400, f"{relation.qualified} has no primary key; search with filters")
    values = request.path_params["key"].split(",")
    if len(values) != len(keys):
        raise ApiError(
            400,
            f"the key of {relation.qualified} is ({', '.join(keys)}): give "
            f"{len(keys)} comma-separated values",
        )
    params: dict[str, Any] = {}
    conditions = typed_filters(relation, policy, dict(zip(keys, values, strict=True)), params)
    sql = f"SELECT * FROM {quote_qualified(relation.qualified)} WHERE {' AND '.join(conditions)}"
    table = await read_table(st, sql, params, policy)
    if table.num_rows == 0:
        raise ApiError(404, f"no row with key {request.path_params['key']!r}")
    return json_response({"table": relation.qualified, **table_to_json(table)})


# rollups -----------------------------------------------------------------------


def _grain_of(view: str) -> tuple[str, str] | None:
    """``("tx", "5m")`` for a rollup view named ``tx_5m``: its rollup and its grain as the
    engine names views (``grain_label``); None for a name of another shape."""
    rollup, _, suffix = view.rpartition("_")
    try:
        spelled = grain_label(parse_duration(suffix))
    except ValueError:
        return None
    return (rollup, suffix) if rollup and spelled == suffix else None


async def rollups(request: Request) -> Response:
    st = state(request)
    st.auth.require(request)
    catalog = await read_catalog(st)
    views = []
    for (schema, _), r in sorted(catalog.relations.items()):
        if schema != "rollup":
            continue
        split = _grain_of(r.name)
        views.append(
            {
                "name": r.name,
                "rollup": split[0] if split else r.name,
                "grain": split[1] if split else None,
                "columns": [{"name": c, "type": t} for c, t in r.columns],
            }
        )
    return json_response(views)


def _rollup_view(catalog: Catalog, view: str, grain: str | None) -> Relation:
    """The rollup view ``view`` (``tx_5m``), or with ``grain`` the rollup ``view``'s view
    at that grain (``tx`` and ``1h``: ``tx_1h``); a 404 naming the grains there are."""
    name = view
    if grain is not None:
        try:
            name = f"{view}_{grain_label(parse_duration(grain))}"
        except ValueError:
            raise ApiError(400, f"bad grain {grain[:20]!r}", ALLOWED) from None
    relation = catalog.get("rollup", name)
    if relation is not None:
        return relation
    split = _grain_of(view) if grain is None else None
    base = split[0] if split else view
    views = [r.name for (schema, _), r in catalog.relations.items() if schema == "rollup"]
    grains = sorted(
        (parts[1] for name in views if (parts := _grain_of(name)) and parts[0] == base),
        key=parse_duration,
    )
    hint = (
        f"rollup {base} has the grains {', '.join(grains)}: /api/rollups/{base}?grain=..."
        if grains
        else "see GET /api/rollups"
    )
    raise ApiError(404, f"no rollup view {name!r}", hint)


async def rollup_rows(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    catalog = await read_catalog(st)
    relation = _rollup_view(catalog, request.path_params["view"], request.query_params.get("grain"))
    columns = dict(relation.columns)
    q = request.query_params
    lo, hi = time_range(request).bounds()
    params: dict[str, Any] = {}
    conditions = []
    if "bucket" in columns:
        params.update({"lo": lo, "hi": hi})
        conditions.append('"bucket" >= $lo AND "bucket" < $hi')
    conditions += typed_filters(relation, policy, prefixed_filters(request, None), params)
    limit = int_param(request, "limit", 5000, 1, 100_000)
    group_by = [g for g in q.get("group_by", "").split(",") if g]
    measures = [m for m in q.get("measures", "").split(",") if m]
    for column in group_by:
        if column not in columns:
            raise ApiError(400, f"cannot group by unknown column {column!r}")
    where = " AND ".join(conditions) or "TRUE"
    if group_by or measures:
        selects = [quote_ident(c) for c in group_by]
        for measure in measures:
            fn, _, column = measure.partition(":")
            if fn not in _AGGREGATES or column not in columns:
                raise ApiError(
                    400,
                    f"bad measure {measure[:60]!r}",
                    f"write fn:column with fn in {sorted(_AGGREGATES)} and a column of the view",
                )
            selects.append(f"{fn}({quote_ident(column)}) AS {quote_ident(fn + '_' + column)}")
        group = f" GROUP BY {', '.join(quote_ident(c) for c in group_by)}" if group_by else ""
        order = f" ORDER BY {', '.join(quote_ident(c) for c in group_by)}" if group_by else ""
        sql = (
            f"SELECT {', '.join(selects)} FROM {quote_qualified(relation.qualified)} "
            f"WHERE {where}{group}{order} LIMIT {limit}"
        )
    else:
        order = ' ORDER BY "bucket"' if "bucket" in columns else ""
        source = quote_qualified(relation.qualified)
        sql = f"SELECT * FROM {source} WHERE {where}{order} LIMIT {limit}"
    table = await read_table(st, sql, params, policy)
    return json_response({"view": relation.qualified, **table_to_json(table)})


def routes() -> list[ApiRoute]:
    """The store contents routes."""
    limit = Param("limit", type="integer")
    return [
        get_route(
            "store",
            "/api/tables",
            tables,
            "Per-table freshness, rollup status and the store's source position",
        ),
        get_route(
            "store",
            "/api/tables/{table}/rows",
            rows,
            "Mirror rows by column equality (?column=value) and text search (?q=)",
            Param("table", "path"),
            Param("q"),
            limit,
            Param("order", description="column, '-column' for descending"),
        ),
        get_route(
            "store",
            "/api/tables/{table}/rows/{key}",
            row_by_key,
            "One mirror row by primary key (comma-separated for composite keys)",
            Param("table", "path"),
            Param("key", "path"),
        ),
        get_route("store", "/api/rollups", rollups, "Rollup views and their columns"),
        get_route(
            "store",
            "/api/rollups/{view}",
            rollup_rows,
            "Rollup rows in a time range, filtered (f.<column>=value) and optionally "
            "grouped (group_by=a,b&measures=sum:col,max:col); the view by name (tx_5m), or "
            "a rollup and its grain (tx?grain=1h)",
            Param("view", "path", description="a rollup view (tx_5m), or a rollup with grain"),
            Param("grain", description="5m, 1h, 1d...: the rollup's view at that grain"),
            *RANGE_PARAMS,
            FILTER_PARAM,
            Param("group_by"),
            Param("measures"),
            limit,
        ),
    ]
