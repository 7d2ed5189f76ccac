"""The read API: dashboards (snapshot, live stream, drill-down), rollups, rows, alerts, accounts.

The routes live by concept: :mod:`~headrace.serve.api_dashboards`,
:mod:`~headrace.serve.api_store` (table freshness, mirror rows, rollups) and
:mod:`~headrace.serve.api_accounts` (alerts, health scores, an account's
page); what their handlers share (request parsing, masked reads) is in
:mod:`~headrace.serve.api_reads`.
"""

from __future__ import annotations

from headrace.serve import api_accounts, api_dashboards, api_store
from headrace.serve.api_reads import MAX_FILTER_VALUE, view_spec
from headrace.serve.openapi import ApiRoute

__all__ = ["MAX_FILTER_VALUE", "routes", "view_spec"]


def routes() -> list[ApiRoute]:
    """The read API's routes."""
    return [*api_dashboards.routes(), *api_store.routes(), *api_accounts.routes()]
