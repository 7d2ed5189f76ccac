"""``headrace bench serve``: live viewers, dashboard loads and SQL while the store is written.

What runs:

- this process: a DuckDB store written at ``rate`` changes/s (batches every
  100 ms). The PostgreSQL pipeline is not wired into this benchmark yet, so
  store versions are driven by writing the store directly (the sample writer:
  mirror, history, rollup state, position and freshness in one transaction per
  batch, then the commit event), and the HTTP server (uvicorn, embedded mode)
  on loopback;
- a separate process (``serve_clients``): N SSE viewers spread over a few
  filter sets, a dashboard load every 0.5 s (page, definition and first tiles
  of a random filter), and SQL queries at ``sql_rate``/s.

Everything is measured after every viewer connected (the connection storm is
over); the event a viewer gets on joining (the view's current state, possibly
computed before it joined) is not an update and is not counted. CPU of this
process (server + store writer) and of the client process are reported, so a
saturated client (which would make the latencies meaningless) shows.

Reports dashboard load p50/p99 (target < 300 ms), commit-to-viewer update
latency p99 (target < 1 s), viewers held without error (target 1,000 on 2
cores), server RSS, and store queries/s actually run against what per-viewer
polling (every viewer re-running every tile every 5 s) would run, as a ratio.
Last line: one JSON object.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from headrace.serve.app import ServerThread, create_app
from headrace.serve.sample import DIMENSIONS, SampleWriter, create_sample_store, sample_dashboard
from headrace.serve.settings import AuthSettings, ServeSettings
from headrace.serve.users import Role, UserStore
from headrace.store.duckdb.store import DuckDBStore

VIEWS = [
    "/api/live/payments?range=1h",
    "/api/live/payments?range=1h&f.currency=EUR",
    "/api/live/payments?range=1h&f.channel=online",
    "/api/live/payments?range=24h",
    "/api/live/payments?range=1h&f.status=declined",
]
SQL = (
    "SELECT currency, channel, count(*) AS n, sum(amount) AS volume FROM mirror.transactions "
    "WHERE created_at >= now() - INTERVAL 10 MINUTE GROUP BY ALL ORDER BY volume DESC"
)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, round(q * (len(values) - 1)))
    return round(sorted(values)[index] * 1000, 1)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def run(  # noqa: PLR0915 - one scenario, read top to bottom
    viewers: int, rate: int, sql_rate: float, duration_s: float, history: int
) -> dict[str, Any]:
    """Run the benchmark; prints progress lines and returns the result."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="headrace-bench-serve-"))
    store = DuckDBStore(workdir / "bench.duckdb")
    create_sample_store(store, accounts=5000)
    writer = SampleWriter(store, accounts=5000)
    now = datetime.now(UTC)
    for minutes in range(0, 60, 5):  # an hour of history, 12 buckets
        writer.write(max(1, history // 12), at=now - timedelta(minutes=minutes + 1))
    settings = ServeSettings(
        store=workdir / "bench.duckdb",
        port=0,
        dashboards=[sample_dashboard()],
        auth=AuthSettings(enabled=True),
    )
    users = UserStore(settings.users_path)
    users.add("bench", Role.ADMIN, "bench-password")
    _, token = users.create_token("bench", "bench")
    users.close()
    server = ServerThread(create_app(settings, store), settings, backlog=4096).start()
    print(f"server on {server.url}; store {workdir}; writing {rate} changes/s", flush=True)

    stop = threading.Event()
    written = [0]

    def write() -> None:
        per_batch = max(1, rate // 10)
        next_at = time.monotonic()
        while not stop.is_set():
            writer.write(per_batch, alert=written[0] % (rate * 5) < per_batch)
            written[0] += per_batch
            next_at += 0.1
            time.sleep(max(0.0, next_at - time.monotonic()))

    config = {
        "host": "127.0.0.1",
        "port": server.port,
        "token": token,
        "viewers": viewers,
        "views": VIEWS,
        "dims": {k: list(v) for k, v in DIMENSIONS.items()},
        "duration_s": duration_s,
        "load_interval_s": 0.5,
        "sql_rate": sql_rate,
        "sql": SQL,
    }
    writer_thread = threading.Thread(target=write, name="bench-writer")
    write_started = time.monotonic()
    writer_thread.start()
    process = psutil.Process()
    clients = subprocess.Popen(
        [sys.executable, "-m", "headrace.bench.serve_clients", json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if clients.stderr is not None:
        clients.stderr.readline()  # "ready": every viewer connected (or failed)
    # The client's result (every latency sample) is larger than a pipe buffer: read it
    # while the clients run, or the client blocks writing it and never exits.
    output: list[str] = []
    reader_thread = threading.Thread(
        target=lambda: output.extend(clients.communicate()), name="bench-client-output"
    )
    reader_thread.start()
    metrics_url = f"{server.url}/metrics"
    import httpx  # noqa: PLC0415 - only the benchmark needs a client here

    with httpx.Client(timeout=30) as http:
        before = http.get(metrics_url).text
        started = time.monotonic()
        cpu_before = process.cpu_times()
        rss_peak = 0
        deadline = started + duration_s + 90
        while clients.poll() is None and time.monotonic() < deadline:
            rss_peak = max(rss_peak, process.memory_info().rss)
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        cpu_after = process.cpu_times()
        after = http.get(metrics_url).text
    # Server and the store writer share this process (user + system time).
    server_cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    server_cpu_percent = round(100 * server_cpu_s / elapsed, 1) if elapsed else None
    reader_thread.join(timeout=60)
    if reader_thread.is_alive():
        clients.kill()
        reader_thread.join()
    out, err = output if len(output) == 2 else ("", "")
    stop.set()
    writer_thread.join()
    write_seconds = time.monotonic() - write_started
    server.stop()
    store.close()
    if clients.returncode != 0:
        raise RuntimeError(f"the client process failed: {err[-2000:]}")
    measured = json.loads(out.strip().splitlines()[-1])

    tile_queries = _metric(after, "headrace_serve_tile_queries_total") - _metric(
        before, "headrace_serve_tile_queries_total"
    )
    tiles = len(sample_dashboard().tiles)
    # The viewers' own measuring window; the metrics were read just before it began
    # and after the viewers left (no views are recomputed without viewers).
    elapsed = float(measured["duration_s"])
    actual_qps = tile_queries / elapsed
    polling_qps = measured["viewers_held"] * tiles / 5.0
    result = {
        "bench": "serve",
        "store_writes": "direct (sample writer); PostgreSQL pipeline not wired in",
        "changes_per_s": round(written[0] / write_seconds, 1),
        "viewers": viewers,
        "viewers_held": measured["viewers_held"],
        "viewer_errors": measured["viewer_errors"],
        "events_received": measured["events"],
        "dashboard_load_p50_ms": _pct(measured["loads"], 0.5),
        "dashboard_load_p99_ms": _pct(measured["loads"], 0.99),
        "dashboard_loads": len(measured["loads"]),
        # Where a load's time goes: p50 / max per phase (page, definition, first tiles).
        "dashboard_load_phases_ms": {
            phase: [_pct(values, 0.5), _pct(values, 1.0)]
            for phase, values in measured["load_phases"].items()
        },
        "dashboard_load_errors": measured["load_errors"],
        "update_latency_p50_ms": _pct(measured["update_latencies"], 0.5),
        "update_latency_p99_ms": _pct(measured["update_latencies"], 0.99),
        "sql_queries": len(measured["sql_latencies"]),
        "sql_errors": measured["sql_errors"],
        "sql_p50_ms": _pct(measured["sql_latencies"], 0.5),
        "sql_p99_ms": _pct(measured["sql_latencies"], 0.99),
        "server_rss_mb": round(rss_peak / 2**20, 1),
        "server_and_writer_cpu_percent": server_cpu_percent,
        "client_cpu_percent": measured["client_cpu_percent"],
        "measured": "after every viewer connected; join events not counted as updates",
        "store_queries_per_s": round(actual_qps, 2),
        "polling_queries_per_s": round(polling_qps, 2),
        "polling_vs_broadcast_ratio": round(polling_qps / actual_qps, 1) if actual_qps else None,
        "duration_s": round(elapsed, 1),
        "targets": {
            "dashboard_load_p99_ms": 300,
            "update_latency_p99_ms": 1000,
            "viewers_held": 1000,
        },
    }
    for key in (
        "dashboard_load_p50_ms",
        "dashboard_load_p99_ms",
        "update_latency_p99_ms",
        "viewers_held",
        "server_rss_mb",
        "polling_vs_broadcast_ratio",
    ):
        print(f"{key}: {result[key]}", flush=True)
    print(json.dumps(result), flush=True)
    return result
