"""Account-centred routes: alerts (and their deliveries), health scores, one account's page."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb
from starlette.requests import Request
from starlette.responses import Response

from headrace.alerts.delivery import RECENT_FAILURES, recent_failures, sink_summaries
from headrace.scores.health import HISTORY, SCORES
from headrace.serve.api_reads import get_route, read_catalog, read_table
from headrace.serve.catalog import Catalog
from headrace.serve.http import ApiError, int_param, json_response
from headrace.serve.openapi import ApiRoute, Param
from headrace.serve.results import table_to_json
from headrace.serve.state import state
from headrace.serve.tiles import quote_ident, quote_qualified
from headrace.serve.users import Role


def _no_table(note: str) -> dict[str, Any]:
    """The answer in place of a table the store does not hold (yet)."""
    return {"columns": [], "rows": [], "note": note}


async def alerts(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    catalog = await read_catalog(st)
    if not catalog.has("headrace.alerts"):
        return json_response(_no_table("no alerts table in the store yet"))
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
    table = await read_table(st, sql, params, st.policy(principal))
    return json_response(table_to_json(table))


async def alert_deliveries(request: Request) -> Response:
    """Per sink: delivered, pending and failed counts, last attempt and errors; and the
    newest failed deliveries (analysts and admins: errors may show receivers' answers)."""
    st = state(request)
    st.auth.require(request, Role.ANALYST)

    def read(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        return {"sinks": sink_summaries(cur), "failed": recent_failures(cur, RECENT_FAILURES)}

    return json_response(await st.reader.call(read))


async def health_scores(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    catalog = await read_catalog(st)
    if not catalog.has("headrace.health_scores"):
        return json_response(_no_table("no health scores in the store yet"))
    q = request.query_params
    if q.get("account_id"):
        limit = int_param(request, "limit", 500, 1, 10_000)
        # The history (a row per change of the score), newest first; a store written
        # before the history existed has only the current score.
        relation = _health_relation(catalog)
        sql = (
            f"SELECT * FROM {relation} WHERE CAST(account_id AS VARCHAR) = $account "
            f"ORDER BY scored_at DESC LIMIT {limit}"
        )
        table = await read_table(st, sql, {"account": q["account_id"]}, st.policy(principal))
    else:
        worst = int_param(request, "worst", 20, 1, 1000)
        sql = (
            "SELECT account_id, arg_max(score, scored_at) AS score, max(scored_at) AS scored_at "
            f"FROM headrace.health_scores GROUP BY account_id ORDER BY score ASC LIMIT {worst}"
        )
        table = await read_table(st, sql, None, st.policy(principal))
    return json_response(table_to_json(table))


async def account(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    policy = st.policy(principal)
    cfg = st.settings.account
    account_id = request.path_params["id"]
    catalog = await read_catalog(st)
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
            health := _health_relation(catalog),
            # The newest points of the history, in time order for the chart.
            f"SELECT * FROM (SELECT * FROM {health} WHERE CAST(account_id AS VARCHAR) = $id "
            "ORDER BY scored_at DESC LIMIT 2000) ORDER BY scored_at",
        ),
    }
    for section, (relation, sql) in sections.items():
        if not catalog.has(relation):
            result[section] = _no_table(f"{relation} is not in the store")
            continue
        result[section] = table_to_json(await read_table(st, sql, params, policy))
    return json_response(result)


def routes() -> list[ApiRoute]:
    """The account-centred routes."""
    return [
        get_route(
            "store",
            "/api/alerts",
            alerts,
            "Alerts, newest first",
            Param("since"),
            Param("severity"),
            Param("rule"),
            Param("account_id"),
            Param("limit", type="integer"),
        ),
        ApiRoute(
            "GET",
            "/api/alerts/deliveries",
            alert_deliveries,
            f"Alert deliveries per sink, and the {RECENT_FAILURES} newest failed ones",
            role="analyst",
            tags=("store",),
        ),
        get_route(
            "store",
            "/api/health-scores",
            health_scores,
            "Health score history of an account, or the worst accounts now",
            Param("account_id"),
            Param("worst", type="integer"),
        ),
        get_route(
            "store",
            "/api/accounts/{id}",
            account,
            "An account: its row, recent transactions, alerts and health history",
            Param("id", "path"),
        ),
    ]


def _health_relation(catalog: Catalog) -> str:
    """Where an account's health history is: ``headrace.health_history`` (a row each
    time the score changed), else the current scores alone."""
    return HISTORY if catalog.has(HISTORY) else SCORES
