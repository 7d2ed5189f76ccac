"""The SQL endpoint and the schema browser (analysts and admins)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from headrace.serve.http import ApiError, json_response, parse_body
from headrace.serve.openapi import ApiRoute
from headrace.serve.results import table_to_csv, table_to_json, table_to_parquet
from headrace.serve.sql import SqlRejectedError, prepare_sql
from headrace.serve.sqlrun import QueryError, describe
from headrace.serve.state import state
from headrace.serve.users import Role


class SqlRequest(BaseModel):
    """A query to run."""

    model_config = ConfigDict(extra="forbid")

    sql: str = Field(description="One SELECT, WITH ... SELECT or EXPLAIN statement.")
    format: Literal["json", "csv", "parquet"] = Field(default="json", description="Result format.")
    query_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Client id, to cancel the query.",
    )


class CancelRequest(BaseModel):
    """A query to cancel."""

    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


async def run_sql(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request, Role.ANALYST)
    body = await parse_body(request, SqlRequest)
    catalog = await st.reader.call(st.reader.catalog)
    try:
        prepared = prepare_sql(
            body.sql,
            catalog,
            st.policy(principal),
            row_limit=st.settings.sql.row_limit,
            max_chars=st.settings.sql.max_query_chars,
        )
    except SqlRejectedError as exc:
        st.metrics.sql_queries.labels("rejected").inc()
        raise ApiError(400, f"query rejected: {exc}") from None
    try:
        with st.metrics.sql_seconds.time():
            result = await st.sql.run(prepared, body.query_id)
    except QueryError as exc:
        st.metrics.sql_queries.labels("failed").inc()
        raise ApiError(exc.status, str(exc)) from None
    st.metrics.sql_queries.labels("ok").inc()
    meta = describe(result)
    headers = {
        "X-Headrace-Rows": str(meta["rows"]),
        "X-Headrace-Truncated": "true" if result.truncated else "false",
    }
    if body.format == "csv":
        return Response(
            table_to_csv(result.table),
            media_type="text/csv",
            headers={**headers, "Content-Disposition": 'attachment; filename="query.csv"'},
        )
    if body.format == "parquet":
        return Response(
            table_to_parquet(result.table),
            media_type="application/vnd.apache.parquet",
            headers={**headers, "Content-Disposition": 'attachment; filename="query.parquet"'},
        )
    return json_response({**meta, "masked": list(prepared.masked), **table_to_json(result.table)})


async def cancel_sql(request: Request) -> Response:
    st = state(request)
    st.auth.require(request, Role.ANALYST)
    body = await parse_body(request, CancelRequest)
    return json_response({"cancelled": st.sql.cancel(body.query_id)})


async def schema(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request, Role.ANALYST)
    policy = st.policy(principal)
    catalog = await st.reader.call(st.reader.catalog)
    result: dict[str, list[dict[str, object]]] = {}
    for (schema_name, _), relation in sorted(catalog.relations.items()):
        masked = set(policy.masked_columns(relation))
        result.setdefault(schema_name, []).append(
            {
                "name": relation.name,
                "kind": relation.kind,
                "columns": [
                    {"name": c, "type": t, "masked": c in masked} for c, t in relation.columns
                ],
            }
        )
    return json_response(result)


def routes() -> list[ApiRoute]:
    """The SQL routes."""
    return [
        ApiRoute(
            "POST",
            "/api/sql",
            run_sql,
            "Run read-only SQL (JSON table, CSV or Parquet); rejected queries say why",
            role="analyst",
            body=SqlRequest,
            produces=("application/json", "text/csv", "application/vnd.apache.parquet"),
            tags=("sql",),
        ),
        ApiRoute(
            "POST",
            "/api/sql/cancel",
            cancel_sql,
            "Cancel a running query by its id",
            role="analyst",
            body=CancelRequest,
            tags=("sql",),
        ),
        ApiRoute(
            "GET",
            "/api/schema",
            schema,
            "Schema browser: mirror, history, rollup and headrace relations and columns",
            role="analyst",
            tags=("sql",),
        ),
    ]
