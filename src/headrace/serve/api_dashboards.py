"""Dashboard routes: definitions, computed tiles, the live stream, filter values, drill-down."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from headrace.serve.api_reads import (
    FILTER_PARAM,
    RANGE_PARAMS,
    dashboard_named,
    get_route,
    prefixed_filters,
    read_catalog,
    read_table,
    view_spec,
)
from headrace.serve.http import ApiError, JsonBytes, json_response
from headrace.serve.live import ViewError
from headrace.serve.openapi import ApiRoute, Param
from headrace.serve.results import table_to_json
from headrace.serve.state import state
from headrace.serve.tiles import quote_ident, quote_qualified
from headrace.serve.users import Role


async def list_dashboards(request: Request) -> Response:
    st = state(request)
    st.auth.require(request)
    return json_response(
        [{"name": d.name, "title": d.title, "tiles": len(d.tiles)} for d in st.settings.dashboards]
    )


async def get_dashboard(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    dashboard = dashboard_named(st, request.path_params["name"])
    data = dashboard.model_dump(mode="json")
    if not principal.allows(Role.ANALYST):
        for tile in data["tiles"]:
            tile.pop("query", None)
    data["ranges"] = ["15m", "1h", "6h", "24h", "7d", "30d", "custom"]
    return json_response(data)


async def dashboard_data(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    spec = view_spec(st, principal, dashboard_named(st, request.path_params["name"]), request)
    try:
        return JsonBytes(await st.hub.snapshot(spec))
    except ViewError as exc:
        raise ApiError(500, str(exc)) from None


async def live(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    spec = view_spec(st, principal, dashboard_named(st, request.path_params["name"]), request)
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
    dashboard = dashboard_named(st, request.path_params["name"])
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
    table = await read_table(st, sql, None, st.policy(principal))
    return json_response({"dimension": dim.name, "values": table.column(0).to_pylist()})


async def drill(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    dashboard = dashboard_named(st, request.path_params["name"])
    tile = dashboard.tile(request.path_params["tile"])
    if tile is None or tile.drill is None:
        raise ApiError(404, "no such tile, or it has no drill-down")
    raw = request.query_params.get("bucket", "")
    try:
        start = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, "parameter 'bucket' must be an ISO 8601 time") from None
    filters = prefixed_filters(request, {d.name for d in dashboard.dimensions})
    spec = tile.drill
    catalog = await read_catalog(st)
    schema_name, _, table_name = spec.table.partition(".")
    relation = catalog.get(schema_name, table_name)
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
    table = await read_table(st, sql, params, st.policy(principal))
    return json_response(
        {
            "table": spec.table,
            "from": params["lo"].isoformat(),
            "to": params["hi"].isoformat(),
            "ignored_filters": ignored,
            **table_to_json(table),
        }
    )


def routes() -> list[ApiRoute]:
    """The dashboard routes."""
    name = Param("name", "path", description="dashboard name")
    return [
        get_route("dashboards", "/api/dashboards", list_dashboards, "List dashboards"),
        get_route(
            "dashboards", "/api/dashboards/{name}", get_dashboard, "A dashboard's definition", name
        ),
        get_route(
            "dashboards",
            "/api/dashboards/{name}/data",
            dashboard_data,
            "Every tile of a dashboard, computed once per store version and filter set",
            name,
            *RANGE_PARAMS,
            FILTER_PARAM,
        ),
        ApiRoute(
            "GET",
            "/api/live/{name}",
            live,
            "Server-sent events: the dashboard's tiles after each new store version",
            params=(name, *RANGE_PARAMS, FILTER_PARAM),
            produces=("text/event-stream",),
            tags=("dashboards",),
        ),
        get_route(
            "dashboards",
            "/api/dashboards/{name}/dimensions/{dim}/values",
            dimension_values,
            "Values of a dimension for the filter pickers",
            name,
            Param("dim", "path"),
        ),
        get_route(
            "dashboards",
            "/api/dashboards/{name}/tiles/{tile}/drill",
            drill,
            "Rows behind one bucket of a chart",
            name,
            Param("tile", "path"),
            Param("bucket", required=True, description="bucket start, ISO 8601"),
            FILTER_PARAM,
        ),
    ]
