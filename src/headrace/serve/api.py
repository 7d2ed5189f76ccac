"""The read API: dashboards (snapshot, live stream, drill-down), rollups, rows, alerts, accounts.

Every query runs on the read threads with the caller's column masks applied
(see sql.mask_trusted_sql); identifiers come from the store's catalog or the
configuration, values are bound parameters.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from headrace.serve.auth import Principal
from headrace.serve.catalog import Catalog, MaskPolicy, Relation
from headrace.serve.compute import ReadError, ViewSpec
from headrace.serve.http import ApiError, JsonBytes, int_param, json_response
from headrace.serve.live import ViewError
from headrace.serve.openapi import ApiRoute, Param
from headrace.serve.results import json_value, table_to_json
from headrace.serve.sql import SqlRejectedError
from headrace.serve.state import ServeState, state
from headrace.serve.tiles import (
    IDENTIFIER,
    Dashboard,
    TimeRange,
    quote_ident,
    quote_qualified,
)
from headrace.serve.users import Role

_AGGREGATES = frozenset({"sum", "min", "max", "avg", "count"})
MAX_FILTER_VALUE = 200


# helpers ---------------------------------------------------------------------


def _dashboard(st: ServeState, name: str) -> Dashboard:
    dashboard = st.settings.dashboard(name)
    if dashboard is None:
        raise ApiError(404, f"no dashboard {name!r}", "see GET /api/dashboards")
    return dashboard


def _time_range(request: Request) -> TimeRange:
    q = request.query_params
    try:
        return TimeRange.parse(q.get("range"), q.get("from"), q.get("to"))
    except ValueError as exc:
        raise ApiError(400, f"bad time range: {exc}") from None


def _filters(request: Request, known: set[str] | None) -> dict[str, str]:
    filters: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if not key.startswith("f."):
            continue
        name = key[2:]
        if known is not None and name not in known:
            raise ApiError(400, f"unknown filter {name!r}", f"filter on one of {sorted(known)}")
        if not IDENTIFIER.match(name):
            raise ApiError(400, f"bad filter name {name[:40]!r}")
        if len(value) > MAX_FILTER_VALUE or not value:
            raise ApiError(400, f"filter {name!r} must be 1..{MAX_FILTER_VALUE} characters")
        filters[name] = value
    return filters


def view_spec(
    st: ServeState, principal: Principal, dashboard: Dashboard, request: Request
) -> ViewSpec:
    """The view a request asks for."""
    filters = _filters(request, {d.name for d in dashboard.dimensions})
    return ViewSpec(
        dashboard, _time_range(request), tuple(sorted(filters.items())), st.policy(principal)
    )


async def _read(
    st: ServeState, sql: str, params: dict[str, Any] | None, policy: MaskPolicy
) -> pa.Table:
    def run(cur: duckdb.DuckDBPyConnection) -> pa.Table:
        return st.reader.read(cur, sql, params, policy)

    try:
        return await st.reader.call(run)
    except (ReadError, SqlRejectedError) as exc:
        raise ApiError(400, str(exc)) from None
    except duckdb.ConversionException as exc:
        raise ApiError(400, f"a parameter does not fit its column: {_line(exc)}") from None
    except duckdb.Error as exc:
        raise ApiError(400, f"{type(exc).__name__}: {_line(exc)}") from None


async def _catalog(st: ServeState) -> Catalog:
    return await st.reader.call(st.reader.catalog)


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _relation(catalog: Catalog, qualified: str) -> Relation | None:
    schema, _, name = qualified.partition(".")
    return catalog.get(schema, name)


def _typed_filters(
    relation: Relation, policy: MaskPolicy, filters: dict[str, str], params: dict[str, Any]
) -> list[str]:
    """Equality conditions on columns of ``relation`` (never on masked columns)."""
    types = dict(relation.columns)
    masked = set(policy.masked_columns(relation))
    conditions: list[str] = []
    for i, (column, value) in enumerate(sorted(filters.items())):
        if column not in types:
            raise ApiError(400, f"{relation.qualified} has no column {column!r}")
        if column in masked:
            raise ApiError(403, f"column {column!r} is masked for your role and cannot be filtered")
        params[f"p{i}"] = value
        conditions.append(f"{quote_ident(column)} = CAST($p{i} AS {types[column]})")
    return conditions


# dashboards ------------------------------------------------------------------


async def list_dashboards(request: Request) -> Response:
    st = state(request)
    st.auth.require(request)
    return json_response(
        [{"name": d.name, "title": d.title, "tiles": len(d.tiles)} for d in st.settings.dashboards]
    )


async def get_dashboard(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    dashboard = _dashboard(st, request.path_params["name"])
    data = dashboard.model_dump(mode="json")
    if not principal.allows(Role.ANALYST):
        for tile in data["tiles"]:
            tile.pop("query", None)
    data["ranges"] = ["15m", "1h", "6h", "24h", "7d", "30d", "custom"]
    return json_response(data)


async def dashboard_data(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    spec = view_spec(st, principal, _dashboard(st, request.path_params["name"]), request)
    try:
        return JsonBytes(await st.hub.snapshot(spec))
    except ViewError as exc:
        raise ApiError(500, str(exc)) from None


async def live(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    spec = view_spec(st, principal, _dashboard(st, request.path_params["name"]), request)
    if st.hub.viewer_count >= st.settings.live.max_viewers:
        raise ApiError(503, "too many live viewers", "retry later")
    view, viewer = st.hub.join(spec, request.headers.get("last-event-id"))
    return StreamingResponse(
        st.hub.stream(view, viewer),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def dimension_values(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    dashboard = _dashboard(st, request.path_params["name"])
    dim = dashboard.dimension(request.path_params["dim"])
    if dim is None:
        raise ApiError(
            404, f"dashboard {dashboard.name!r} has no dimension {request.path_params['dim']!r}"
        )
    if not dashboard.dimension_source:
        return json_response({"dimension": dim.name, "values": []})
    sql = (
        f"SELECT DISTINCT CAST({quote_ident(dim.column)} AS VARCHAR) AS v "
        f"FROM {quote_qualified(dashboard.dimension_source)} WHERE {quote_ident(dim.column)} "
        "IS NOT NULL ORDER BY 1 LIMIT 500"
    )
    table = await _read(st, sql, None, st.policy(principal))
    return json_response({"dimension": dim.name, "values": table.column(0).to_pylist()})


async def drill(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    dashboard = _dashboard(st, request.path_params["name"])
    tile = dashboard.tile(request.path_params["tile"])
    if tile is None or tile.drill is None:
        raise ApiError(404, "no such tile, or it has no drill-down")
    raw = request.query_params.get("bucket", "")
    try:
        start = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, "parameter 'bucket' must be an ISO 8601 time") from None
    filters = _filters(request, {d.name for d in dashboard.dimensions})
    spec = tile.drill
    catalog = await _catalog(st)
    relation = _relation(catalog, spec.table)
    if relation is None:
        raise ApiError(404, f"{spec.table} is not in the store")
    columns = dict(relation.columns)
    params: dict[str, Any] = {"lo": start, "hi": start + timedelta(seconds=spec.grain_s)}
    conditions = [
        f"{quote_ident(spec.time_column)} >= $lo",
        f"{quote_ident(spec.time_column)} < $hi",
    ]
    ignored: list[str] = []
    accepted = set(tile.dimensions) if tile.dimensions is not None else None
    for i, (name, value) in enumerate(sorted(filters.items())):
        dim = dashboard.dimension(name)
        column = spec.dimension_columns.get(name, dim.column if dim else name)
        if (accepted is not None and name not in accepted) or column not in columns:
            ignored.append(name)
            continue
        params[f"d{i}"] = value
        conditions.append(f"CAST({quote_ident(column)} AS VARCHAR) = $d{i}")
    order = spec.order_by or spec.time_column
    sql = (
        f"SELECT * FROM {quote_qualified(spec.table)} WHERE {' AND '.join(conditions)} "
        f"ORDER BY {quote_ident(order)} DESC LIMIT {spec.limit}"
    )
    table = await _read(st, sql, params, st.policy(principal))
    return json_response(
        {
            "table": spec.table,
            "from": params["lo"].isoformat(),
            "to": params["hi"].isoformat(),
            "ignored_filters": ignored,
            **table_to_json(table),
        }
    )


# store contents --------------------------------------------------------------


async def tables(request: Request) -> Response:
    st = state(request)
    st.auth.require(request)
    catalog = await _catalog(st)
    result: dict[str, Any] = {"tables": [], "rollups": []}
    if catalog.has("headrace.tables"):
        table = await _read(
            st,
            "SELECT *, epoch(now() - last_commit_ts) AS freshness_s FROM headrace.tables "
            "ORDER BY table_name",
            None,
            MaskPolicy(),
        )
        result["tables"] = table.to_pylist()
    if catalog.has("headrace.rollups"):
        table = await _read(
            st,
            "SELECT name, state, reason, updated_at FROM headrace.rollups ORDER BY name",
            None,
            MaskPolicy(),
        )
        result["rollups"] = table.to_pylist()
    return json_response(json_value(result))


async def rows(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    catalog = await _catalog(st)
    name = request.path_params["table"]
    relation = catalog.get("mirror", name)
    if relation is None:
        raise ApiError(404, f"no mirrored table {name!r}", "see GET /api/schema")
    limit = int_param(request, "limit", 100, 1, 1000)
    reserved = {"limit", "q", "order"}
    filters = {k: v for k, v in request.query_params.items() if k not in reserved}
    params: dict[str, Any] = {}
    conditions = _typed_filters(relation, policy, filters, params)
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
    table = await _read(st, sql, params, policy)
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
    catalog = await _catalog(st)
    name = request.path_params["table"]
    relation = catalog.get("mirror", name)
    if relation is None:
        raise ApiError(404, f"no mirrored table {name!r}", "see GET /api/schema")
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
    conditions = _typed_filters(relation, policy, dict(zip(keys, values, strict=True)), params)
    sql = f"SELECT * FROM {quote_qualified(relation.qualified)} WHERE {' AND '.join(conditions)}"
    table = await _read(st, sql, params, policy)
    if table.num_rows == 0:
        raise ApiError(404, f"no row with key {request.path_params['key']!r}")
    return json_response({"table": relation.qualified, **table_to_json(table)})


async def rollups(request: Request) -> Response:
    st = state(request)
    st.auth.require(request)
    catalog = await _catalog(st)
    views = [
        {"name": r.name, "columns": [{"name": c, "type": t} for c, t in r.columns]}
        for (schema, _), r in sorted(catalog.relations.items())
        if schema == "rollup"
    ]
    return json_response(views)


async def rollup_rows(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    catalog = await _catalog(st)
    relation = catalog.get("rollup", request.path_params["view"])
    if relation is None:
        raise ApiError(
            404, f"no rollup view {request.path_params['view']!r}", "see GET /api/rollups"
        )
    columns = dict(relation.columns)
    q = request.query_params
    time_range = _time_range(request)
    lo, hi = time_range.bounds()
    params: dict[str, Any] = {}
    conditions = []
    if "bucket" in columns:
        params.update({"lo": lo, "hi": hi})
        conditions.append('"bucket" >= $lo AND "bucket" < $hi')
    conditions += _typed_filters(relation, policy, _filters(request, None), params)
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
    table = await _read(st, sql, params, policy)
    return json_response({"view": relation.qualified, **table_to_json(table)})


async def alerts(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    catalog = await _catalog(st)
    if not catalog.has("headrace.alerts"):
        return json_response(
            {"columns": [], "rows": [], "note": "no alerts table in the store yet"}
        )
    q = request.query_params
    limit = int_param(request, "limit", 100, 1, 5000)
    params: dict[str, Any] = {}
    conditions = []
    for name in ("severity", "rule"):
        if q.get(name):
            params[name] = q[name]
            conditions.append(f"{name} = ${name}")
    if q.get("account_id"):
        params["account"] = q["account_id"]
        conditions.append("CAST(account_id AS VARCHAR) = $account")
    if q.get("since"):
        try:
            params["since"] = datetime.fromisoformat(q["since"])
        except ValueError:
            raise ApiError(400, "parameter 'since' must be an ISO 8601 time") from None
        conditions.append("detected_at >= $since")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = f"SELECT * FROM headrace.alerts{where} ORDER BY detected_at DESC LIMIT {limit}"
    table = await _read(st, sql, params, st.policy(principal))
    return json_response(table_to_json(table))


async def health_scores(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    catalog = await _catalog(st)
    if not catalog.has("headrace.health_scores"):
        return json_response(
            {"columns": [], "rows": [], "note": "no health scores in the store yet"}
        )
    q = request.query_params
    if q.get("account_id"):
        limit = int_param(request, "limit", 500, 1, 10_000)
        sql = (
            "SELECT * FROM headrace.health_scores WHERE CAST(account_id AS VARCHAR) = $account "
            f"ORDER BY scored_at DESC LIMIT {limit}"
        )
        table = await _read(st, sql, {"account": q["account_id"]}, st.policy(principal))
    else:
        worst = int_param(request, "worst", 20, 1, 1000)
        sql = (
            "SELECT account_id, arg_max(score, scored_at) AS score, max(scored_at) AS scored_at "
            f"FROM headrace.health_scores GROUP BY account_id ORDER BY score ASC LIMIT {worst}"
        )
        table = await _read(st, sql, None, st.policy(principal))
    return json_response(table_to_json(table))


async def account(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    cfg = st.settings.account
    account_id = request.path_params["id"]
    catalog = await _catalog(st)
    result: dict[str, Any] = {"id": account_id}
    params = {"id": account_id}
    sections = {
        "account": (
            cfg.table,
            f"SELECT * FROM {quote_qualified(cfg.table)} WHERE CAST({quote_ident(cfg.key)} AS "
            "VARCHAR) = $id LIMIT 1",
        ),
        "transactions": (
            cfg.transactions_table,
            f"SELECT * FROM {quote_qualified(cfg.transactions_table)} WHERE "
            f"CAST({quote_ident(cfg.account_column)} AS VARCHAR) = $id "
            f"ORDER BY {quote_ident(cfg.time_column)} DESC LIMIT {cfg.limit}",
        ),
        "alerts": (
            "headrace.alerts",
            "SELECT * FROM headrace.alerts WHERE CAST(account_id AS VARCHAR) = $id "
            "ORDER BY detected_at DESC LIMIT 100",
        ),
        "health": (
            "headrace.health_scores",
            "SELECT * FROM headrace.health_scores WHERE CAST(account_id AS VARCHAR) = $id "
            "ORDER BY scored_at LIMIT 2000",
        ),
    }
    for section, (relation, sql) in sections.items():
        if not catalog.has(relation):
            result[section] = {"columns": [], "rows": [], "note": f"{relation} is not in the store"}
            continue
        result[section] = table_to_json(await _read(st, sql, params, policy))
    return json_response(result)


def routes() -> list[ApiRoute]:
    """The read API's routes."""
    range_params = (
        Param("range", description="15m, 1h, 6h, 24h, 7d, 30d or custom"),
        Param("from", description="ISO 8601 start (range=custom)"),
        Param("to", description="ISO 8601 end (range=custom)"),
        Param("f.<dimension>", description="filter: dimension value (repeat per dimension)"),
    )
    name = Param("name", "path", description="dashboard name")
    return [
        ApiRoute(
            "GET", "/api/dashboards", list_dashboards, "List dashboards", tags=("dashboards",)
        ),
        ApiRoute(
            "GET",
            "/api/dashboards/{name}",
            get_dashboard,
            "A dashboard's definition",
            params=(name,),
            tags=("dashboards",),
        ),
        ApiRoute(
            "GET",
            "/api/dashboards/{name}/data",
            dashboard_data,
            "Every tile of a dashboard, computed once per store version and filter set",
            params=(name, *range_params),
            tags=("dashboards",),
        ),
        ApiRoute(
            "GET",
            "/api/live/{name}",
            live,
            "Server-sent events: the dashboard's tiles after each new store version",
            params=(name, *range_params),
            produces=("text/event-stream",),
            tags=("dashboards",),
        ),
        ApiRoute(
            "GET",
            "/api/dashboards/{name}/dimensions/{dim}/values",
            dimension_values,
            "Values of a dimension for the filter pickers",
            params=(name, Param("dim", "path")),
            tags=("dashboards",),
        ),
        ApiRoute(
            "GET",
            "/api/dashboards/{name}/tiles/{tile}/drill",
            drill,
            "Rows behind one bucket of a chart",
            params=(
                name,
                Param("tile", "path"),
                Param("bucket", required=True, description="bucket start, ISO 8601"),
                range_params[3],
            ),
            tags=("dashboards",),
        ),
        ApiRoute(
            "GET", "/api/tables", tables, "Per-table freshness and rollup status", tags=("store",)
        ),
        ApiRoute(
            "GET",
            "/api/tables/{table}/rows",
            rows,
            "Mirror rows by column equality (?column=value) and text search (?q=)",
            params=(
                Param("table", "path"),
                Param("q"),
                Param("limit", type="integer"),
                Param("order", description="column, '-column' for descending"),
            ),
            tags=("store",),
        ),
        ApiRoute(
            "GET",
            "/api/tables/{table}/rows/{key}",
            row_by_key,
            "One mirror row by primary key (comma-separated for composite keys)",
            params=(Param("table", "path"), Param("key", "path")),
            tags=("store",),
        ),
        ApiRoute("GET", "/api/rollups", rollups, "Rollup views and their columns", tags=("store",)),
        ApiRoute(
            "GET",
            "/api/rollups/{view}",
            rollup_rows,
            "Rollup rows in a time range, filtered (f.<column>=value) and optionally "
            "grouped (group_by=a,b&measures=sum:col,max:col)",
            params=(
                Param("view", "path"),
                *range_params[:3],
                range_params[3],
                Param("group_by"),
                Param("measures"),
                Param("limit", type="integer"),
            ),
            tags=("store",),
        ),
        ApiRoute(
            "GET",
            "/api/alerts",
            alerts,
            "Alerts, newest first",
            params=(
                Param("since"),
                Param("severity"),
                Param("rule"),
                Param("account_id"),
                Param("limit", type="integer"),
            ),
            tags=("store",),
        ),
        ApiRoute(
            "GET",
            "/api/health-scores",
            health_scores,
            "Health score history of an account, or the worst accounts now",
            params=(Param("account_id"), Param("worst", type="integer")),
            tags=("store",),
        ),
        ApiRoute(
            "GET",
            "/api/accounts/{id}",
            account,
            "An account: its row, recent transactions, alerts and health history",
            params=(Param("id", "path"),),
            tags=("store",),
        ),
    ]
