"""What the read API's handlers share: request parsing and running a masked read.

Every query runs on the read threads with the caller's column masks applied
(see sql.mask_trusted_sql); identifiers come from the store's catalog or the
configuration, values are bound parameters.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
from starlette.requests import Request

from headrace.errors import first_line
from headrace.serve.auth import Principal
from headrace.serve.catalog import Catalog, MaskPolicy, Relation
from headrace.serve.compute import ReadError, ViewSpec
from headrace.serve.http import ApiError
from headrace.serve.openapi import ApiRoute, Endpoint, Param
from headrace.serve.sql import SqlRejectedError
from headrace.serve.state import ServeState
from headrace.serve.tiles import IDENTIFIER, Dashboard, TimeRange, quote_ident

MAX_FILTER_VALUE = 200
"""The longest filter or search value a request may give (characters)."""


def get_route(tag: str, path: str, endpoint: Endpoint, summary: str, *params: Param) -> ApiRoute:
    """A JSON GET route of the read API (viewer role), tagged ``tag``."""
    return ApiRoute("GET", path, endpoint, summary, params=params, tags=(tag,))


# request parsing ---------------------------------------------------------------

RANGE_PARAMS = (
    Param("range", description="15m, 1h, 6h, 24h, 7d, 30d or custom"),
    Param("from", description="ISO 8601 start (range=custom)"),
    Param("to", description="ISO 8601 end (range=custom)"),
)
"""The query parameters :func:`time_range` reads."""

FILTER_PARAM = Param("f.<dimension>", description="filter: dimension value (repeat per dimension)")
"""The query parameter :func:`prefixed_filters` reads (once per filtered name)."""


def dashboard_named(st: ServeState, name: str) -> Dashboard:
    """The configured dashboard ``name``, or a 404."""
    dashboard = st.settings.dashboard(name)
    if dashboard is None:
        raise ApiError(404, f"no dashboard {name!r}", "see GET /api/dashboards")
    return dashboard


def time_range(request: Request) -> TimeRange:
    """The request's ``range`` (or ``from``/``to``), or a 400."""
    q = request.query_params
    try:
        return TimeRange.parse(q.get("range"), q.get("from"), q.get("to"))
    except ValueError as exc:
        raise ApiError(400, f"bad time range: {exc}") from None


def prefixed_filters(request: Request, known: set[str] | None) -> dict[str, str]:
    """The request's ``f.<name>=value`` filters; ``known`` limits the names (None: any)."""
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
    filters = prefixed_filters(request, {d.name for d in dashboard.dimensions})
    return ViewSpec(
        dashboard, time_range(request), tuple(sorted(filters.items())), st.policy(principal)
    )


def typed_filters(
    relation: Relation, policy: MaskPolicy, filters: dict[str, str], params: dict[str, Any]
) -> list[str]:
    """Equality conditions on columns of ``relation`` (never on masked columns).

    Binds each value into ``params`` as ``$p<i>``, cast to its column's type.
    """
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


# reading ---------------------------------------------------------------------


async def read_table(
    st: ServeState, sql: str, params: dict[str, Any] | None, policy: MaskPolicy
) -> pa.Table:
    """Run ``sql`` on the read threads under ``policy``; what it cannot run is a 400."""

    def run(cur: duckdb.DuckDBPyConnection) -> pa.Table:
        return st.reader.read(cur, sql, params, policy)

    try:
        return await st.reader.call(run)
    except (ReadError, SqlRejectedError) as exc:
        raise ApiError(400, str(exc)) from None
    except duckdb.ConversionException as exc:
        raise ApiError(400, f"a parameter does not fit its column: {first_line(exc)}") from None
    except duckdb.Error as exc:
        raise ApiError(400, f"{type(exc).__name__}: {first_line(exc)}") from None


async def read_catalog(st: ServeState) -> Catalog:
    """The store's relations and columns, read on the read threads."""
    return await st.reader.call(st.reader.catalog)
