"""The ASGI app: ``create_app(settings, store)``, and a thread to run it inside another process.

Embedded mode (``headrace run --serve``)::

    store = DuckDBStore(path)                      # the engine's store; publishes each commit
    server = ServerThread(create_app(settings, store), settings)
    server.start()                                 # uvicorn on its own thread and event loop
    ...                                            # engine.apply(batch) ... (writer thread)
    server.stop()

Standalone (``headrace serve``): ``create_app(settings, ReadOnlyStore(path))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from headrace import __version__
from headrace.errors import ConfigError
from headrace.serve import api, api_auth, api_sql, pages
from headrace.serve.auth import Authenticator
from headrace.serve.compute import StoreReader
from headrace.serve.http import ApiError, BodyLimit, json_response
from headrace.serve.live import LiveHub
from headrace.serve.metrics import ServeMetrics
from headrace.serve.openapi import ApiRoute, build_openapi
from headrace.serve.settings import ServeSettings, is_loopback
from headrace.serve.sqlrun import SqlRunner
from headrace.serve.state import ServeState, state
from headrace.serve.store import ServedStore, harden, position_status
from headrace.serve.users import UserStore
from headrace.store.duckdb.store import DuckDBStore

_log = logging.getLogger(__name__)

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


def check_exposure(settings: ServeSettings, users: UserStore | None) -> None:
    """Refuse to listen beyond loopback unless logins are required and a user exists."""
    if is_loopback(settings.host):
        return
    if not settings.auth.enabled:
        raise ConfigError(
            f"refusing to listen on {settings.host} with authentication disabled",
            "listen on 127.0.0.1, or enable auth (serve.auth.enabled: true)",
        )
    if users is None or users.count() == 0:
        raise ConfigError(
            f"refusing to listen on {settings.host}: no user exists, so nobody could log in "
            "and the server would be open",
            "create one first: headrace user add NAME --role admin",
        )


class _Observe:
    """Counts requests by route and status, adds security headers, answers 500s as JSON."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def wrapped(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:
            _log.exception("unhandled error on %s", scope.get("path"))
            self.metrics.errors.labels("http").inc()
            if not started:
                response = JSONResponse({"error": "internal error (see the server log)"}, 500)
                await response(scope, receive, send)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(label, str(status)).inc()


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):  # registered for ApiError only
        raise exc
    return exc.response()


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    detail = getattr(exc, "detail", "not found")
    return JSONResponse({"error": str(detail)}, status_code=status)


def _harden(store: ServedStore, settings: ServeSettings) -> None:
    # ReadOnlyStore is hardened (and locked) when it opens. The engine's DuckDBStore
    # is hardened here, unlocked: its cursors SET TimeZone, which a lock would refuse.
    if isinstance(store, DuckDBStore):
        harden(store.writer, settings.sql.memory_limit, settings.sql.threads, lock=False)


def create_app(settings: ServeSettings, store: ServedStore) -> Starlette:
    """The whole HTTP app over ``store`` (live or read-only)."""
    _harden(store, settings)
    users = UserStore(settings.users_path) if settings.auth.enabled else None
    check_exposure(settings, users)
    metrics = ServeMetrics(store.cursor)
    reader = StoreReader(store, settings.live, metrics)
    hub = LiveHub(reader, settings.live, metrics)
    sql = SqlRunner(store.cursor, settings.sql)
    hr = ServeState(
        settings=settings,
        store=store,
        reader=reader,
        hub=hub,
        sql=sql,
        auth=Authenticator(users, enabled=settings.auth.enabled),
        users=users,
        metrics=metrics,
    )
    api_routes: list[ApiRoute] = [*api_auth.routes(), *api.routes(), *api_sql.routes()]

    async def health(request: Request) -> Response:
        st = state(request)
        try:
            # A tiny read, but on the read threads: bounded, health must answer.
            position = await asyncio.wait_for(st.reader.call(position_status), 2.0)
        except TimeoutError:
            position = {"lsn": None, "as_of": None, "note": "read threads busy"}
        return json_response(
            {
                "status": "ok",
                "version": st.store.version,
                "viewers": st.hub.viewer_count,
                "position": position,
            }
        )

    async def metrics_endpoint(request: Request) -> Response:
        st = state(request)
        if not st.settings.metrics_public:
            st.auth.require(request)
        body = await st.reader.call(lambda _cur: st.metrics.render())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # Described in the OpenAPI document too (routed below, outside /api).
    described = [
        ApiRoute(
            "GET",
            "/health",
            health,
            "Liveness: the store version, viewers and source position",
            role="public",
            tags=("service",),
        ),
        ApiRoute(
            "GET",
            "/metrics",
            metrics_endpoint,
            "Prometheus metrics (text exposition): serving, the store's tables and a running "
            "pipeline's figures",
            role="public" if settings.metrics_public else "viewer",
            produces=("text/plain",),
            tags=("service",),
        ),
    ]
    spec = build_openapi([*api_routes, *described], __version__)

    async def openapi(request: Request) -> Response:
        return json_response(spec)

    async def api_not_found(request: Request) -> Response:
        raise ApiError(
            404, f"no API route {request.method} {request.url.path}", "see /api/openapi.json"
        )

    routes: list[BaseRoute] = [
        Route(r.path, r.endpoint, methods=[r.method], name=f"{r.method} {r.path}")
        for r in api_routes
    ]
    routes += [
        Route("/api/openapi.json", openapi),
        Route("/health", health),
        Route("/metrics", metrics_endpoint),
        Route("/api/{rest:path}", api_not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        *pages.routes(),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.close()
            sql.close()
            reader.close()
            if users is not None:
                users.close()

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(_Observe, metrics=metrics),
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers={ApiError: _api_error, 404: _not_found, 405: _not_found},
        lifespan=lifespan,
    )
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    app.state.hr = hr
    return app


class HeadraceServer(uvicorn.Server):
    """uvicorn, ending the live streams first when asked to stop.

    uvicorn waits for open responses before shutting down; server-sent event
    streams never finish by themselves, so the hub is closed first.
    """

    async def shutdown(self, sockets: Any = None) -> None:
        app = self.config.app
        hr: ServeState | None = getattr(getattr(app, "state", None), "hr", None)
        if hr is not None:
            await hr.hub.close()
        await super().shutdown(sockets)


class ServerThread:
    """uvicorn serving an app on its own thread (embedded mode, tests, benchmarks)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, **uvicorn_options: Any) -> None:
        options: dict[str, Any] = {
            "host": settings.host,
            "port": settings.port,
            "log_level": "warning",
            "lifespan": "on",
            "timeout_graceful_shutdown": 2,
            "access_log": False,
            **uvicorn_options,
        }
        self.server = HeadraceServer(uvicorn.Config(app, **options))
        self._thread = threading.Thread(target=self.server.run, name="headrace-serve", daemon=True)

    def start(self, timeout: float = 20.0) -> ServerThread:
        """Start and wait until it accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the HTTP server did not start", "see the log above")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("server not started")

    @property
    def url(self) -> str:
        """Base URL."""
        host = self.server.config.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for it."""
        self.server.should_exit = True
        self._thread.join(timeout)
