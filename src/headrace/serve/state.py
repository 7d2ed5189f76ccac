"""The parts one app instance holds, reachable from every route as ``request.app.state.hr``."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from headrace.serve.auth import Authenticator, Principal
from headrace.serve.catalog import MaskPolicy, mask_policy
from headrace.serve.compute import StoreReader
from headrace.serve.live import LiveHub
from headrace.serve.metrics import ServeMetrics
from headrace.serve.settings import ServeSettings
from headrace.serve.sqlrun import SqlRunner
from headrace.serve.store import ServedStore
from headrace.serve.users import UserStore


@dataclass
class ServeState:
    """Everything a request handler may need."""

    settings: ServeSettings
    store: ServedStore
    reader: StoreReader
    hub: LiveHub
    sql: SqlRunner
    auth: Authenticator
    users: UserStore | None
    metrics: ServeMetrics

    def policy(self, principal: Principal) -> MaskPolicy:
        """Masks of the caller's role."""
        return mask_policy(self.settings.masked_columns, principal.role.label)


def state(request: Request) -> ServeState:
    """The app's state."""
    value: ServeState = request.app.state.hr
    return value
