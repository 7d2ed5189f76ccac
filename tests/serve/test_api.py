"""The HTTP API over a real store and a real server: auth, roles, CSRF, masking, bad input."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from headrace.errors import ConfigError
from headrace.serve.app import ServerThread, create_app
from headrace.serve.sample import create_sample_store
from headrace.serve.settings import AuthSettings
from headrace.serve.store import ReadOnlyStore
from headrace.store.duckdb.store import DuckDBStore
from tests.serve.conftest import PASSWORDS, Served, make_settings

DUMMY = {"name": "payments", "dim": "currency", "tile": "volume_5m", "table": "transactions",
         "key": "1", "view": "tx_volume_5m", "id": "1"}  # fmt: skip


def operations(served: Served) -> list[tuple[str, str, str]]:
    """(method, concrete path, role) of every documented API operation."""
    spec = served.client().get("/api/openapi.json").json()
    result = []
    for path, methods in spec["paths"].items():
        concrete = re.sub(r"\{(\w+)\}", lambda m: DUMMY[m.group(1)], path)
        for method, op in methods.items():
            text = op["description"]
            role = "public" if text.startswith("No auth") else text.split(" ")[2]
            result.append((method.upper(), concrete, role))
    return result


def test_openapi_lists_the_api(served: Served) -> None:
    spec = served.client().get("/api/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in (
        "/api/sql",
        "/api/live/{name}",
        "/api/rollups/{view}",
        "/api/alerts",
        "/api/health-scores",
        "/api/tables",
        "/api/accounts/{id}",
        "/api/login",
        "/health",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert "SqlRequest" in spec["components"]["schemas"]


def test_every_route_needs_authentication(served: Served) -> None:
    anonymous = served.client()
    for method, path, role in operations(served):
        if role == "public":
            continue
        reply = anonymous.request(method, path, json={} if method == "POST" else None)
        assert reply.status_code == 401, (method, path, reply.text)
        assert reply.json()["error"]
    bad_token = served.client(headers={"Authorization": "Bearer hr_nope"})
    assert bad_token.get("/api/me").status_code == 401
    assert served.client(headers={"Authorization": "Basic eDp5"}).get("/api/me").status_code == 401


def test_roles_are_enforced(served: Served) -> None:
    rank = {"viewer": 1, "analyst": 2, "admin": 3}
    for method, path, needed in operations(served):
        if needed == "public":
            continue
        for role in ("viewer", "analyst"):
            if rank[role] >= rank[needed]:
                continue
            reply = served.client(role).request(method, path, json={} if method == "POST" else None)
            assert reply.status_code == 403, (role, method, path, reply.text)
            assert "role" in reply.json()["error"]


def test_malformed_json_on_every_post_route(served: Served) -> None:
    admin = served.client("admin")
    posts = [p for m, p, _ in operations(served) if m == "POST" and p != "/api/logout"]
    assert {"/api/sql", "/api/sql/cancel", "/api/users", "/api/tokens", "/api/login"} <= set(posts)
    for path in posts:
        for body, ctype, status in [
            (b"{not json", "application/json", 400),
            (b"[1, 2]", "application/json", 400),
            (b'"text"', "application/json", 400),
            (b"\xff\xfe", "application/json", 400),
            (b'{"sql": 1}', "text/plain", 415),
            (b'{"unexpected": true, "sql": 5, "name": null}', "application/json", 422),
        ]:
            reply = admin.post(path, content=body, headers={"Content-Type": ctype})
            assert reply.status_code == status, (path, body, reply.text)
            assert reply.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/dashboards/payments/data?range=bogus",
        "/api/dashboards/payments/data?range=custom&from=yesterday&to=now",
        "/api/dashboards/payments/data?range=custom&from=2024-01-02T00:00:00&to=2024-01-01T00:00:00",
        "/api/dashboards/payments/data?f.nope=x",
        "/api/dashboards/payments/data?f.currency=" + "x" * 500,
        "/api/live/payments?range=1y",
        "/api/dashboards/payments/tiles/volume_5m/drill?bucket=notatime",
        "/api/dashboards/payments/tiles/volume_5m/drill",
        "/api/tables/transactions/rows?limit=abc",
        "/api/tables/transactions/rows?limit=100000",
        "/api/tables/transactions/rows?nosuchcolumn=1",
        "/api/tables/transactions/rows?amount=notanumber",
        "/api/tables/transactions/rows?order=evil",
        "/api/tables/transactions/rows/1,2",
        "/api/rollups/tx_volume_5m?group_by=nope",
        "/api/rollups/tx_volume_5m?measures=drop:table",
        "/api/rollups/tx_volume_5m?measures=sum:nope",
        "/api/alerts?since=later",
        "/api/alerts?limit=-1",
        "/api/health-scores?worst=0",
    ],
)
def test_bad_parameters_get_400(served: Served, path: str) -> None:
    reply = served.client("admin").get(path)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/dashboards/nope",
        "/api/dashboards/nope/data",
        "/api/dashboards/payments/dimensions/nope/values",
        "/api/dashboards/payments/tiles/tx_count/drill?bucket=2024-01-01T00:00:00",
        "/api/tables/nope/rows",
        "/api/tables/transactions/rows/999999999",
        "/api/rollups/nope",
        "/api/nothing/here",
    ],
)
def test_unknown_things_get_404(served: Served, path: str) -> None:
    reply = served.client("admin").get(path)
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]


def test_oversized_bodies_get_413(served: Served) -> None:
    analyst = served.client("analyst")
    big = "SELECT 1 -- " + "x" * (served.settings.max_body_bytes + 10)
    reply = analyst.post("/api/sql", json={"sql": big})
    assert reply.status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"sql": "SELECT 1 -- '
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}'

    reply = analyst.post("/api/sql", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    long_sql = "SELECT 1 -- " + "x" * 30_000
    reply = analyst.post("/api/sql", json={"sql": long_sql})
    assert reply.status_code == 400
    assert "characters" in reply.json()["error"]


def test_session_login_csrf_logout(served: Served) -> None:
    client, csrf = served.login("analyst")
    assert client.get("/api/me").json()["role"] == "analyst"
    cookie = client.cookies.get("hr_session")
    assert cookie
    no_csrf = client.post("/api/sql", json={"sql": "SELECT 1 AS one"})
    assert no_csrf.status_code == 403
    assert "CSRF" in no_csrf.json()["error"]
    wrong = client.post("/api/sql", json={"sql": "SELECT 1"}, headers={"X-CSRF-Token": "x"})
    assert wrong.status_code == 403
    ok = client.post("/api/sql", json={"sql": "SELECT 1 AS one"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200
    assert ok.json()["rows"] == [[1]]
    assert client.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    again = httpx.Client(base_url=served.url, cookies={"hr_session": cookie})
    try:
        assert again.get("/api/me").status_code == 401
    finally:
        again.close()


def test_login_failures_are_throttled(served: Served) -> None:
    created = served.client("admin").post("/api/users", json={"name": "mallory", "role": "viewer"})
    password = created.json()["password"]
    client = served.client()
    for _ in range(5):
        reply = client.post("/api/login", json={"username": "mallory", "password": "wrong-pass"})
        assert reply.status_code == 401
    reply = client.post("/api/login", json={"username": "mallory", "password": password})
    assert reply.status_code == 429
    ok = client.post("/api/login", json={"username": "viewer", "password": PASSWORDS["viewer"]})
    assert ok.status_code == 200
    assert client.post("/api/login", json={"username": "ghost", "password": "x"}).status_code == 401


def test_tokens_and_users_admin(served: Served) -> None:
    viewer = served.client("viewer")
    created = viewer.post("/api/tokens", json={"label": "mine"}).json()
    own = served.client(headers={"Authorization": f"Bearer {created['token']}"})
    assert own.get("/api/me").json()["user"] == "viewer"
    assert [t["label"] for t in viewer.get("/api/tokens").json()].count("mine") == 1
    assert viewer.delete(f"/api/tokens/{created['id']}").status_code == 200
    assert own.get("/api/me").status_code == 401

    admin = served.client("admin")
    reply = admin.post("/api/users", json={"name": "carol", "role": "viewer"})
    assert reply.status_code == 201
    assert len(reply.json()["password"]) >= 12
    assert admin.post("/api/users", json={"name": "carol", "role": "viewer"}).status_code == 409
    assert "carol" in [u["name"] for u in admin.get("/api/users").json()]
    assert admin.delete("/api/users/carol").status_code == 200
    assert admin.delete("/api/users/carol").status_code == 404
    assert admin.delete("/api/users/admin").status_code == 400
    assert admin.get("/api/config").json()["sql"]["row_limit"] == 1000


def test_masked_columns_in_api_dashboards_and_sql(served: Served) -> None:
    def first_row(role: str) -> dict[str, Any]:
        body = served.client(role).get("/api/tables/transactions/rows?limit=1").json()
        return dict(zip([c["name"] for c in body["columns"]], body["rows"][0], strict=True))

    viewer, analyst, admin = first_row("viewer"), first_row("analyst"), first_row("admin")
    assert viewer["card_number"] == "****"
    assert viewer["ip"] == "****"
    assert analyst["card_number"] == "****"
    assert analyst["ip"].startswith("10.")
    assert admin["card_number"].startswith("4111")

    reply = served.client("viewer").get(
        f"/api/tables/transactions/rows?card_number={admin['card_number']}"
    )
    assert reply.status_code == 403
    search = served.client("viewer").get("/api/tables/transactions/rows?q=4111").json()
    assert search["rows"] == []

    def recent(role: str) -> list[Any]:
        data = served.client(role).get("/api/dashboards/payments/data").json()
        tile = next(t for t in data["tiles"] if t["name"] == "recent")
        column = [c["name"] for c in tile["columns"]].index("card_number")
        return [row[column] for row in tile["rows"]]

    assert set(recent("viewer")) == {"****"}
    assert all(v.startswith("4111") for v in recent("admin"))

    sql = "SELECT t.card_number AS c, upper(ip) AS i FROM mirror.transactions t LIMIT 3"
    body = served.client("analyst").post("/api/sql", json={"sql": sql}).json()
    assert {row[0] for row in body["rows"]} == {"****"}
    assert body["masked"] == ["mirror.transactions.card_number"]
    schema = served.client("analyst").get("/api/schema").json()
    columns = {
        c["name"]: c
        for c in next(r for r in schema["mirror"] if r["name"] == "transactions")["columns"]
    }
    assert columns["card_number"]["masked"]
    assert not columns["ip"]["masked"]


def test_rows_rollups_alerts_accounts(served: Served) -> None:
    admin = served.client("admin")
    row = admin.get("/api/tables/transactions/rows/1").json()
    assert row["rows"][0][0] == 1
    eur = admin.get("/api/tables/transactions/rows?currency=EUR&limit=1000&order=-amount").json()
    currency = [c["name"] for c in eur["columns"]].index("currency")
    assert eur["rows"]
    assert {r[currency] for r in eur["rows"]} == {"EUR"}
    grouped = admin.get(
        "/api/rollups/tx_volume_5m?range=30d&group_by=currency&measures=sum:tx_count"
    ).json()
    total = admin.post("/api/sql", json={"sql": "SELECT count(*) FROM mirror.transactions"})
    assert sum(r[1] for r in grouped["rows"]) == total.json()["rows"][0][0]
    filtered = admin.get(
        "/api/rollups/tx_volume_5m?range=30d&f.currency=EUR&measures=sum:tx_count"
    ).json()
    assert filtered["rows"][0][0] == len(eur["rows"])
    (view,) = admin.get("/api/rollups").json()
    assert (view["name"], view["rollup"], view["grain"]) == ("tx_volume_5m", "tx_volume", "5m")
    summed = "range=30d&measures=sum:tx_count"
    by_grain = admin.get(f"/api/rollups/tx_volume?grain=5m&{summed}").json()
    assert by_grain["rows"] == admin.get(f"/api/rollups/tx_volume_5m?{summed}").json()["rows"]
    missing = admin.get("/api/rollups/tx_volume?grain=1h")
    assert missing.status_code == 404
    assert "rollup tx_volume has the grains 5m" in missing.json()["fix"]
    assert admin.get("/api/rollups/tx_volume?grain=5x").status_code == 400
    without = admin.get("/api/rollups/tx_volume_1h").json()
    assert "rollup tx_volume has the grains 5m" in without["fix"]
    alerts = admin.get("/api/alerts?severity=high").json()
    assert len(alerts["rows"]) == 1
    tables = admin.get("/api/tables").json()
    assert tables["tables"][0]["table_name"] == "public.transactions"
    assert tables["rollups"][0]["state"] == "active"
    account_id = alerts["rows"][0][[c["name"] for c in alerts["columns"]].index("account_id")]
    account = admin.get(f"/api/accounts/{account_id}").json()
    assert account["account"]["rows"]
    assert account["alerts"]["rows"]
    assert "health" in account
    assert admin.get("/api/health-scores").json()["rows"] == []


def test_an_accounts_health_is_its_history(served: Served) -> None:
    """The account page charts every recorded score of the account (the engine appends
    a row to headrace.health_history each time it changes; health_scores keeps the
    current one), and the API lists them newest first."""
    start = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    points = [(start + timedelta(minutes=10 * i), score) for i, score in enumerate((92, 75, 61))]
    with served.store.transaction() as con:
        con.executemany(
            "INSERT INTO headrace.health_history VALUES (7, ?, ?, ?, '{}')",
            [(score, at, at) for at, score in points],
        )
        con.execute(
            "INSERT INTO headrace.health_scores VALUES (7, 61, ?, ?, '{}')",
            [points[-1][0], points[-1][0]],
        )
        other = "INSERT INTO headrace.health_history VALUES (8, 40, ?, ?, '{}')"
        con.execute(other, [start, start])  # another account's history stays out
    admin = served.client("admin")
    health = admin.get("/api/accounts/7").json()["health"]
    names = [c["name"] for c in health["columns"]]
    assert [row[names.index("score")] for row in health["rows"]] == [92, 75, 61]
    listed = admin.get("/api/health-scores?account_id=7").json()
    assert [row[names.index("score")] for row in listed["rows"]] == [61, 75, 92]
    worst = admin.get("/api/health-scores?worst=5").json()
    assert [row[0] for row in worst["rows"]] == [7]  # the current scores only


def test_drill_down_returns_the_rows_of_the_bucket(served: Served) -> None:
    at = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=7, second=0, microsecond=0)
    served.writer.write(5, at=at, currency="GBP", channel="atm")
    served.writer.write(3, at=at, currency="USD", channel="atm")
    bucket = at.replace(minute=5)
    admin = served.client("admin")
    path = "/api/dashboards/payments/tiles/volume_5m/drill"
    both = admin.get(path, params={"bucket": bucket.isoformat()}).json()
    assert len(both["rows"]) == 8
    gbp = admin.get(path, params={"bucket": bucket.isoformat(), "f.currency": "GBP"}).json()
    assert len(gbp["rows"]) == 5
    assert gbp["ignored_filters"] == []
    data = admin.get("/api/dashboards/payments/data", params={"range": "6h", "f.currency": "GBP"})
    series = next(t for t in data.json()["tiles"] if t["name"] == "count_5m")
    point = next(r for r in series["rows"] if r[0].startswith(bucket.isoformat()[:16]))
    assert point[1] == 5


def test_filters_change_every_filterable_tile(served: Served) -> None:
    served.writer.write(30)
    viewer = served.client("viewer")
    everything = viewer.get("/api/dashboards/payments/data").json()["tiles"]
    only = viewer.get("/api/dashboards/payments/data?f.channel=atm").json()["tiles"]
    for full, filtered in zip(everything, only, strict=True):
        if full["name"] == "alerts":
            assert filtered["ignored_filters"] == ["channel"]
            continue
        assert filtered["ignored_filters"] == []
        assert full["rows"] != filtered["rows"], full["name"]


def test_health_and_metrics(served: Served) -> None:
    assert served.client().get("/health").json()["status"] == "ok"
    served.client("viewer").get("/api/dashboards/payments/data")
    text = served.client().get("/metrics").text
    for name in (
        "headrace_serve_viewers",
        'headrace_table_freshness_seconds{table="public.transactions"}',
        "headrace_serve_view_computations_total",
        "headrace_serve_requests_total",
        "headrace_serve_sql_queries_total",
        "headrace_store_version",
    ):
        assert name in text, name


def test_pages_redirect_and_gate_by_role(served: Served) -> None:
    anonymous = served.client()
    reply = anonymous.get("/sql")
    assert reply.status_code == 303
    assert reply.headers["location"].startswith("/login")
    viewer, _ = served.login("viewer")
    assert viewer.get("/sql").status_code == 403
    assert viewer.get("/admin").status_code == 403
    assert viewer.get("/dashboard/payments").status_code == 200
    analyst, _ = served.login("analyst")
    assert analyst.get("/sql").status_code == 200
    assert "default-src 'self'" in analyst.get("/sql").headers["content-security-policy"]
    assert anonymous.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_refuses_to_listen_beyond_loopback_without_auth(tmp_path: Path, sample_store: Any) -> None:
    store, _ = sample_store
    everywhere = "0.0.0.0"  # noqa: S104 - checking that this is refused
    path = tmp_path / "store.duckdb"
    open_settings = make_settings(path, host=everywhere, auth=AuthSettings(enabled=False))
    with pytest.raises(ConfigError, match="authentication disabled"):
        create_app(open_settings, store)
    no_users = make_settings(path, host=everywhere)
    with pytest.raises(ConfigError, match="no user exists"):
        create_app(no_users, store)


def test_serves_a_store_file_read_only(tmp_path: Path, serve: Callable[..., Served]) -> None:
    path = tmp_path / "ro.duckdb"
    writable = DuckDBStore(path)
    create_sample_store(writable)
    writable.close()
    store = ReadOnlyStore(path, poll_s=0.1)
    settings = make_settings(path, auth=AuthSettings(enabled=False))
    server = ServerThread(create_app(settings, store), settings).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            data = client.get("/api/dashboards/payments/data").json()
            assert {t["name"] for t in data["tiles"]} >= {"volume_5m", "alerts"}
            assert client.get("/api/me").json()["role"] == "admin"
            reply = client.post("/api/sql", json={"sql": "SELECT count(*) FROM mirror.accounts"})
            assert reply.json()["rows"] == [[50]]
    finally:
        server.stop()
        store.close()
