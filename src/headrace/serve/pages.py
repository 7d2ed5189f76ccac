"""HTML pages of the UI: static files, gated by login and role."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from headrace.serve.state import state
from headrace.serve.users import Role

STATIC = Path(__file__).parent / "static"

_FORBIDDEN = """<!doctype html><html><head><meta charset="utf-8"><title>Not allowed</title>
<link rel="stylesheet" href="/static/app.css"></head><body class="page">
<main class="narrow"><h1>Not allowed</h1><p id="forbidden">The {role} role cannot open this page
(it needs {needed}).</p><p><a href="/">Back to the dashboards</a></p></main></body></html>"""


# file name -> (mtime_ns, bytes). FileResponse stats, opens and reads the file in
# worker threads: several thread hops per page load, each slow while the read
# threads and the store writer keep the cores busy. The pages are small; they
# are kept in memory and re-read when the file changes.
_PAGE_CACHE: dict[str, tuple[int, bytes]] = {}


def _html_file(file: str) -> Response:
    path = STATIC / file
    mtime = path.stat().st_mtime_ns
    cached = _PAGE_CACHE.get(file)
    if cached is None or cached[0] != mtime:
        cached = (mtime, path.read_bytes())
        _PAGE_CACHE[file] = cached
    return Response(cached[1], media_type="text/html", headers={"Cache-Control": "no-store"})


def _page(file: str, role: Role = Role.VIEWER) -> Route:
    async def endpoint(request: Request) -> Response:
        st = state(request)
        principal = st.auth.identify(request)
        if principal is None:
            target = quote(str(request.url.path), safe="/")
            return RedirectResponse(f"/login?next={target}", status_code=303)
        if not principal.allows(role):
            body = _FORBIDDEN.format(role=principal.role.label, needed=role.label)
            return HTMLResponse(body, status_code=403)
        return _html_file(file)

    endpoint.__name__ = f"page_{file.split('.', maxsplit=1)[0]}"
    return Route("/" + file.split(".", maxsplit=1)[0], endpoint)


async def home(request: Request) -> Response:
    st = state(request)
    if st.auth.identify(request) is None:
        return RedirectResponse("/login", status_code=303)
    first = st.settings.dashboards[0].name if st.settings.dashboards else "overview"
    return RedirectResponse(f"/dashboard/{first}", status_code=303)


async def login_page(request: Request) -> Response:
    return _html_file("login.html")


def routes() -> list[Route]:
    """Page routes."""
    dashboard = _page("dashboard.html")
    account = _page("account.html")
    return [
        Route("/", home),
        Route("/login", login_page),
        Route("/dashboard/{name}", dashboard.endpoint),
        Route("/account/{id}", account.endpoint),
        _page("sql.html", Role.ANALYST),
        _page("admin.html", Role.ADMIN),
    ]
