"""``headrace bench serve``: live viewers, dashboard loads and SQL while PostgreSQL is written.

What runs (every part its own process, on one machine):

- PostgreSQL (a throwaway cluster) with the reference fintech deployment's
  schema and a month of history (:mod:`.serve_stack`);
- ``headrace run --config headrace.yaml --serve``: the deployment as shipped
  (rollups, fraud rules, health score, and its dashboard), snapshot first,
  then streaming changes through the engine into DuckDB, with the HTTP app
  in the same process (embedded mode);
- the fintech workload generator writing ``rate`` row changes/s into
  PostgreSQL (:mod:`.serve_workload`), started once streaming began,
  ``warmup_s`` (12 s) before the viewers connect;
- the load (:mod:`.serve_clients`): N SSE viewers of the fintech dashboard
  over loopback, spread over a few filter sets and time ranges; a dashboard
  load every 0.5 s (page, definition, first tiles of a random filter set);
  SQL queries at ``sql_rate``/s.

Everything is measured after every viewer connected (the connection storm is
over); the event a viewer gets on joining is not an update and is not
counted. Commit-to-viewer latency of an update is the time the viewer
received it minus the PostgreSQL commit time of the newest change it
reflects (the event's ``as_of``, read from the store in the same read
transaction as the tiles). The pipeline's own part of it (commit → visible
in the store) is reported beside it from ``headrace run``'s status.

Reports dashboard load p50/p99 (target < 300 ms), commit-to-viewer p99
(target < 1 s), viewers held without error (target 1,000 on 2 cores), the
RSS of ``headrace run --serve``, the ingest rate achieved (written to
PostgreSQL and applied to the store), CPU per process, and the store
queries/s actually run against what per-viewer polling (every viewer
re-running every tile every 5 s) would run, as a ratio. What the serving side
costs is also given per store version (robust on a shared machine, unlike the
latencies): the read threads' statements by kind, tile results shared between
views, view computations, and the read threads' CPU. Last line: one JSON
object.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from headrace.bench.process_cpu import ProcessCpu
from headrace.bench.run_process import checkpoints_between
from headrace.bench.serve_stack import ServeStack, WriteLoad
from headrace.run.metrics import FreshnessHistogram

SQL = (
    "SELECT currency, channel, count(*) AS n, sum(amount) AS volume FROM mirror.transactions "
    "WHERE created_at >= now() - INTERVAL 10 MINUTE GROUP BY ALL ORDER BY volume DESC"
)
VIEW_QUERIES = (
    "range=1h",
    "range=1h&f.currency=EUR",
    "range=1h&f.channel=online",
    "range=24h",
    "range=1h&f.status=declined",
)
"""What the viewers watch (viewer i watches VIEW_QUERIES[i % 5]): five live views."""
TARGETS = {"dashboard_load_p99_ms": 300, "commit_to_viewer_p99_ms": 1000, "viewers_held": 1000}


@dataclass(frozen=True)
class ServeBenchSettings:
    """What ``headrace bench serve`` runs (its CLI options)."""

    viewers: int = 250
    """Concurrent live (SSE) viewers."""
    rate: float = 2000.0
    """Row changes/s written into PostgreSQL."""
    sql_rate: float = 2.0
    """SQL queries/s sent to ``POST /api/sql``."""
    seconds: float = 30.0
    """Length of the measuring window."""
    customers: int = 10_000
    """Customers of the simulated bank (a month of their history is loaded first)."""
    warmup_s: float = 12.0
    """Write load before the viewers connect: the workload reaches its steady rate (its
    settlements follow transactions by seconds) and so does the pipeline."""


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of seconds, in ms."""
    if not values:
        return None
    index = min(len(values) - 1, round(q * (len(values) - 1)))
    return round(sorted(values)[index] * 1000, 1)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples called ``name`` on a ``/metrics`` page, with their labels."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def _metric(text: str, name: str) -> float:
    """An unlabelled sample's value (0 when absent)."""
    return next((value for labels, value in _samples(text, name) if not labels), 0.0)


def _labelled(text: str, name: str) -> dict[str, float]:
    """A one-label counter's values by label value."""
    return {next(iter(labels.values())): value for labels, value in _samples(text, name) if labels}


def _per_s(after: dict[str, Any], before: dict[str, Any], total: str, digits: int) -> float | None:
    """Growth per second of one of ``headrace run``'s status totals between two reads."""
    seconds = float(after["updated_unix"]) - float(before["updated_unix"])
    if seconds <= 0:
        return None
    growth = float(after["totals"][total]) - float(before["totals"][total])
    return round(growth / seconds, digits)


def _dimension_values(http: httpx.Client, url: str, dashboard: str) -> dict[str, list[str]]:
    """Filter values per dimension, as the dashboard's pickers get them."""
    definition = http.get(f"{url}/api/dashboards/{dashboard}").json()
    values: dict[str, list[str]] = {}
    for dim in definition.get("dimensions", []):
        name = dim["name"]
        found = http.get(f"{url}/api/dashboards/{dashboard}/dimensions/{name}/values").json()
        if found.get("values"):
            values[name] = [str(v) for v in found["values"]]
    return values


@dataclass
class _Sample:
    """What is read at each end of the measuring window."""

    at: float
    metrics: str
    status: dict[str, Any]
    cpu: dict[str, float]
    waits: dict[str, float]


def _sample(
    http: httpx.Client, url: str, stack: ServeStack, cpus: dict[str, ProcessCpu]
) -> _Sample:
    return _Sample(
        time.monotonic(),
        http.get(f"{url}/metrics").text,
        stack.headrace.status(),
        {name: cpu.cpu_seconds() for name, cpu in cpus.items()},
        {name: cpu.wait_seconds() for name, cpu in cpus.items()},
    )


def _start_clients(
    settings: ServeBenchSettings, stack: ServeStack, dashboard: str, dims: dict[str, list[str]]
) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """The client process, once every viewer connected; its output is read on a thread."""
    config = {
        "host": stack.serving.host,
        "port": stack.serving.port,
        "token": stack.token,
        "viewers": settings.viewers,
        "views": [f"/api/live/{dashboard}?{query}" for query in VIEW_QUERIES],
        "dashboard": dashboard,
        "dims": dims,
        "duration_s": settings.seconds,
        "load_interval_s": 0.5,
        "sql_rate": settings.sql_rate,
        "sql": SQL,
    }
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
    reader = threading.Thread(
        target=lambda: output.extend(clients.communicate()), name="bench-client-output"
    )
    reader.start()
    return clients, output, reader


def _measure(
    settings: ServeBenchSettings, stack: ServeStack, load: WriteLoad, dashboard: str
) -> tuple[str, _Sample, _Sample, int]:
    """The viewers, loads and queries against the running stack: the client process's
    output, the samples at each end of the window, and the peak RSS of ``headrace run``."""
    url, run_process = stack.url, ProcessCpu(stack.headrace.pid)
    cpus = {
        "headrace_run": run_process,
        "write_load": ProcessCpu(load.pid),
        "postgres": stack.postgres_cpu(),
    }
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {stack.token}"}) as http:
        dims = _dimension_values(http, url, dashboard)
        print(f"{settings.viewers} viewers connecting to {dashboard!r}", flush=True)
        clients, output, reader = _start_clients(settings, stack, dashboard, dims)
        try:
            before = _sample(http, url, stack, cpus)
            rss_peak = 0
            deadline = before.at + settings.seconds + 90
            while clients.poll() is None and time.monotonic() < deadline:
                rss_peak = max(rss_peak, run_process.rss())
                stack.headrace.status()  # raises if headrace run died
                if not load.running():
                    raise RuntimeError("the write load stopped")
                time.sleep(0.5)
            after = _sample(http, url, stack, cpus)
            reader.join(timeout=60)
        finally:
            if clients.poll() is None:
                clients.kill()
            reader.join()
    out, err = output if len(output) == 2 else ("", "")
    if clients.returncode != 0:
        raise RuntimeError(f"the client process failed ({clients.returncode}): {err[-2000:]}")
    return out, before, after, rss_peak


def run(settings: ServeBenchSettings) -> dict[str, Any]:
    """Run the benchmark; prints progress lines and returns the result (also printed last)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    load_before = os.getloadavg()
    with ServeStack(settings.customers) as stack:
        stack.start()
        dashboard = stack.serving.dashboards[0]
        load = WriteLoad(stack.dsn, settings.rate, settings.customers).start()
        try:
            print(f"writing {settings.rate:,.0f} changes/s into PostgreSQL", flush=True)
            time.sleep(settings.warmup_s)
            out, before, after, rss_peak = _measure(settings, stack, load, dashboard.name)
        except Exception:
            print(f"headrace run's log ends with:\n{stack.log_tail()}", file=sys.stderr)
            raise
        finally:
            load.stop()
        code = stack.close()
    if code != 0:
        raise RuntimeError(f"headrace run exited with {code}:\n{stack.failed_log}")
    measured = json.loads(out.strip().splitlines()[-1])
    result = _result(
        settings=settings,
        stack=stack,
        measured=measured,
        before=before,
        after=after,
        load=load,
        rss_peak=rss_peak,
        tiles=len(dashboard.tiles),
    )
    result["load_average_before"] = [round(x, 2) for x in load_before]
    for key in (
        "changes_written_per_s",
        "changes_applied_per_s",
        "dashboard_load_p50_ms",
        "dashboard_load_p99_ms",
        "commit_to_viewer_p50_ms",
        "commit_to_viewer_p99_ms",
        "store_checkpoints",
        "cpu_waits",
        "viewers_held",
        "server_rss_mb",
        "polling_vs_broadcast_ratio",
    ):
        print(f"{key}: {result[key]}", flush=True)
    print(json.dumps(result), flush=True)
    return result


def _result(
    *,
    settings: ServeBenchSettings,
    stack: ServeStack,
    measured: dict[str, Any],
    before: _Sample,
    after: _Sample,
    load: WriteLoad,
    rss_peak: int,
    tiles: int,
) -> dict[str, Any]:
    window = after.at - before.at
    written, behind = load.rate_between(before.at, after.at)
    freshness = FreshnessHistogram(after.status.get("freshness_histogram")).since(
        FreshnessHistogram(before.status.get("freshness_histogram"))
    )
    tile_queries = _metric(after.metrics, "headrace_serve_tile_queries_total") - _metric(
        before.metrics, "headrace_serve_tile_queries_total"
    )
    # The viewers' own measuring window; the metrics were read just before it began
    # and after the viewers left (no views are recomputed without viewers).
    elapsed = float(measured["duration_s"])
    actual_qps = tile_queries / elapsed

    def grown(name: str) -> float:
        return _metric(after.metrics, name) - _metric(before.metrics, name)

    kinds_before = _labelled(before.metrics, "headrace_serve_store_queries_total")
    queries_by_kind = {
        kind: round((count - kinds_before.get(kind, 0.0)) / elapsed, 2)
        for kind, count in sorted(
            _labelled(after.metrics, "headrace_serve_store_queries_total").items()
        )
    }
    versions = grown("headrace_store_commits_seen_total")
    compute_cpu_s = grown("headrace_serve_compute_cpu_seconds_total")
    run_cpu_s = after.cpu["headrace_run"] - before.cpu["headrace_run"]
    polling_qps = measured["viewers_held"] * tiles / 5.0
    cpu = {
        name: round(100 * (after.cpu[name] - before.cpu[name]) / window, 1) for name in before.cpu
    }
    cpu["clients"] = measured["client_cpu_percent"]
    waits = {
        name: round((after.waits[name] - before.waits[name]) / window, 2) for name in before.waits
    }
    latencies = measured["update_latencies"]
    return {
        "bench": "serve",
        "source": "PostgreSQL -> headrace run --serve (fintech deployment, embedded mode)",
        "rate_target": settings.rate,
        "changes_written_per_s": None if written is None else round(written, 1),
        "changes_applied_per_s": _per_s(after.status, before.status, "changes", 1),
        "write_load_behind_s_max": behind,
        # The pipeline's share of commit-to-viewer: commit -> visible in the store.
        "store_freshness_p50_ms": freshness.percentile(0.5),
        "store_freshness_p99_ms": freshness.percentile(0.99),
        # Seconds spent applying batches per second (1.0: the store writer never idles).
        "pipeline_apply_busy": _per_s(after.status, before.status, "apply_seconds", 2),
        "store_transactions_per_s": _per_s(after.status, before.status, "store_transactions", 2),
        "store_checkpoints": checkpoints_between(before.status, after.status),
        "history_rows": stack.history_rows,
        "snapshot_s": stack.snapshot_seconds,
        "viewers": settings.viewers,
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
        # The five slowest tiles of those first computations: p50 / max ms per tile.
        "dashboard_load_slowest_tiles_ms": dict(
            sorted(
                (
                    (name, [_pct(values, 0.5), _pct(values, 1.0)])
                    for name, values in measured["load_tiles"].items()
                ),
                key=lambda item: -(item[1][0] or 0.0),
            )[:5]
        ),
        "dashboard_load_errors": measured["load_errors"],
        "commit_to_viewer_p50_ms": _pct(latencies, 0.5),
        "commit_to_viewer_p99_ms": _pct(latencies, 0.99),
        "commit_to_viewer_max_ms": _pct(latencies, 1.0),
        "updates_measured": len(latencies),
        # The broadcast's share: received minus the time the server finished the view.
        "delivery_p50_ms": _pct(measured["deliveries"], 0.5),
        "delivery_p99_ms": _pct(measured["deliveries"], 0.99),
        "sql_queries": len(measured["sql_latencies"]),
        "sql_errors": measured["sql_errors"],
        "sql_p50_ms": _pct(measured["sql_latencies"], 0.5),
        "sql_p99_ms": _pct(measured["sql_latencies"], 0.99),
        "server_rss_mb": round(rss_peak / 2**20, 1),
        # Per process, 100 = one core; the machine's cores are shared by all of them.
        "cpu_percent": cpu,
        # Thread-seconds per second runnable but waiting for a core (live threads only).
        "cpu_waits": waits,
        "measured": "after every viewer connected; join events not counted as updates",
        "store_queries_per_s": round(actual_qps, 2),
        # Every statement of the read threads by kind (tile, read, position, catalog), and
        # tile results shared by views of the same snapshot instead of run again.
        "store_queries_per_s_by_kind": queries_by_kind,
        "tile_reuses_per_s": round(grown("headrace_serve_tile_reuses_total") / elapsed, 2),
        "view_computations_per_s": round(
            grown("headrace_serve_view_computations_total") / elapsed, 2
        ),
        "store_versions_per_s": round(versions / window, 2),
        # CPU of the read threads (tile and API reads), per second and per store version,
        # and of the whole headrace run process per store version.
        "serve_compute_cpu_ms_per_s": round(1000 * compute_cpu_s / elapsed, 1),
        "serve_compute_cpu_ms_per_version": (
            round(1000 * compute_cpu_s / versions, 1) if versions else None
        ),
        "headrace_run_cpu_ms_per_version": (
            round(1000 * run_cpu_s / versions, 1) if versions else None
        ),
        "polling_queries_per_s": round(polling_qps, 2),
        "polling_vs_broadcast_ratio": round(polling_qps / actual_qps, 1) if actual_qps else None,
        "tiles": tiles,
        "duration_s": round(elapsed, 1),
        "cores": os.cpu_count(),
        "targets": TARGETS,
    }
