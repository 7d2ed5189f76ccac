"""Load generator of ``headrace bench serve``, run as a separate process.

``python -m headrace.bench.serve_clients CONFIG_JSON`` opens N server-sent
event streams (raw asyncio sockets: cheap enough for 1,000 of them in one
process), loads the dashboard repeatedly to time it, sends SQL queries at a
rate, and prints one JSON object with what it measured.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sys
import time
from datetime import datetime
from typing import Any
from urllib.parse import quote

_AS_OF = re.compile(rb'"as_of":"([^"]+)"')
_COMPUTED_AT = re.compile(rb'"computed_at":"([^"]+)"')
_VERSION = re.compile(rb'"version":(\d+)')
LINE_LIMIT = 2**26


async def _request(
    host: str, port: int, method: str, path: str, token: str, *, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    # A tile event is one line of JSON, larger than asyncio's default 64 KiB line limit
    # for a long range (hundreds of buckets per chart).
    reader, writer = await asyncio.open_connection(host, port, limit=LINE_LIMIT)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: */*\r\n"
    )
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1]) if status_line else 0
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return reader, writer, status


class Window:
    """The measuring window: opened once every viewer connected (the storm is over)."""

    def __init__(self) -> None:
        self.open = False


class Viewer:
    """One live viewer: counts events, records commit-to-receipt latency per new version.

    Per update it also records the delivery time: received minus the event's
    ``computed_at`` (when the server finished computing the view), which is the
    broadcast's share of the latency.

    Only updates count: the event a viewer gets on joining is the view's current state
    (possibly computed long before it joined), and events received before the
    measuring window opens (during the connection storm) are not recorded.
    """

    def __init__(self, window: Window) -> None:
        self.window = window
        self.events = 0
        self.errors = 0
        self.connected = False
        self.latencies: list[float] = []
        self.deliveries: list[float] = []
        self.last_version = -1

    async def run(self, host: str, port: int, path: str, token: str, stop: asyncio.Event) -> None:
        try:
            reader, writer, status = await _request(host, port, "GET", path, token)
        except OSError:
            self.errors += 1
            return
        if status != 200:
            self.errors += 1
            writer.close()
            return
        self.connected = True
        try:
            while not stop.is_set():
                line = await reader.readline()
                if not line:
                    self.errors += 1  # the server closed the stream early
                    break
                if not line.startswith(b"data: "):
                    continue
                now = time.time()
                self.events += 1
                version = _VERSION.search(line)
                as_of = _AS_OF.search(line)
                if version is None or int(version.group(1)) <= self.last_version:
                    continue
                first = self.last_version < 0
                self.last_version = int(version.group(1))
                if as_of and self.window.open and not first:
                    committed = datetime.fromisoformat(as_of.group(1).decode()).timestamp()
                    self.latencies.append(now - committed)
                    computed = _COMPUTED_AT.search(line)
                    if computed:
                        done = datetime.fromisoformat(computed.group(1).decode()).timestamp()
                        self.deliveries.append(now - done)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1  # ValueError: a line longer than LINE_LIMIT
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()


LOAD_PHASES = ("page", "definition", "first_tiles")


async def load_dashboard(
    host: str,
    port: int,
    token: str,
    *,
    dashboard: str,
    dims: dict[str, list[str]],
    phases: dict[str, list[float]],
    tile_seconds: dict[str, list[float]],
) -> float:
    """Page, definition and the first tiles of a (random) filter set: seconds.

    Appends each phase's seconds to ``phases`` (keys: ``LOAD_PHASES``), and each
    tile's query time, as the server measured it, to ``tile_seconds`` by tile name.
    """
    started = time.perf_counter()
    pages = (("page", f"/dashboard/{dashboard}"), ("definition", f"/api/dashboards/{dashboard}"))
    for phase, path in pages:
        phase_started = time.perf_counter()
        reader, writer, _ = await _request(host, port, "GET", path, token)
        await _read_body(reader)
        writer.close()
        phases[phase].append(time.perf_counter() - phase_started)
    tiles_started = time.perf_counter()
    # Random filter sets, so most loads need a new view computed (the worst case).
    dim = random.choice(sorted(dims))  # noqa: S311 - load pattern, not security
    value = random.choice(dims[dim])  # noqa: S311 - load pattern, not security
    path = f"/api/live/{dashboard}?range=1h&f.{dim}={quote(value)}"
    reader, writer, status = await _request(host, port, "GET", path, token)
    try:
        while True:
            line = await reader.readline()
            if not line:
                raise OSError(f"stream ended, status {status}")
            if line.startswith(b"data: "):
                phases["first_tiles"].append(time.perf_counter() - tiles_started)
                elapsed = time.perf_counter() - started
                for tile in json.loads(line[len(b"data: ") :]).get("tiles", []):
                    tile_seconds.setdefault(tile["name"], []).append(tile["elapsed_ms"] / 1000)
                return elapsed
    finally:
        writer.close()


async def main(config: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0915 - one scenario
    host, port, token = config["host"], config["port"], config["token"]
    views: list[str] = config["views"]
    stop = asyncio.Event()
    window = Window()
    viewers = [Viewer(window) for _ in range(config["viewers"])]
    tasks = []
    for i, viewer in enumerate(viewers):
        tasks.append(
            asyncio.create_task(viewer.run(host, port, views[i % len(views)], token, stop))
        )
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # ramp up
    ramp_deadline = time.monotonic() + 30
    while sum(v.connected or v.errors > 0 for v in viewers) < len(viewers):
        if time.monotonic() > ramp_deadline:
            break
        await asyncio.sleep(0.1)
    print("ready", flush=True, file=sys.stderr)
    connected = sum(v.connected for v in viewers)
    print(f"{connected} viewers connected", flush=True, file=sys.stderr)
    window.open = True
    started = time.monotonic()
    cpu_started = time.process_time()
    loads: list[float] = []
    phases: dict[str, list[float]] = {phase: [] for phase in LOAD_PHASES}
    tile_seconds: dict[str, list[float]] = {}
    load_errors = 0
    sql_latencies: list[float] = []
    sql_errors = 0

    async def loader() -> None:
        nonlocal load_errors
        while not stop.is_set():
            try:
                loads.append(
                    await load_dashboard(
                        host,
                        port,
                        token,
                        dashboard=config["dashboard"],
                        dims=config["dims"],
                        phases=phases,
                        tile_seconds=tile_seconds,
                    )
                )
            except (OSError, ValueError):
                load_errors += 1
            await asyncio.sleep(config["load_interval_s"])

    async def sql() -> None:
        nonlocal sql_errors
        interval = 1.0 / config["sql_rate"]
        body = json.dumps({"sql": config["sql"]}).encode()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                reader, writer, status = await _request(
                    host, port, "POST", "/api/sql", token, body=body
                )
                await _read_body(reader)
                writer.close()
                if status != 200:
                    sql_errors += 1
                else:
                    sql_latencies.append(time.perf_counter() - t0)
            except OSError:
                sql_errors += 1
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    helpers = [asyncio.create_task(loader())]
    if config["sql_rate"] > 0:
        helpers.append(asyncio.create_task(sql()))
    await asyncio.sleep(config["duration_s"])
    stop.set()
    client_cpu_s = time.process_time() - cpu_started
    held = sum(1 for v in viewers if v.connected and v.errors == 0)
    for task in [*helpers, *tasks]:
        task.cancel()
    await asyncio.gather(*helpers, *tasks, return_exceptions=True)
    latencies = sorted(x for v in viewers for x in v.latencies)
    duration_s = time.monotonic() - started
    return {
        "duration_s": round(duration_s, 2),
        "client_cpu_percent": round(100 * client_cpu_s / duration_s, 1),
        "viewers_held": held,
        "viewer_errors": sum(v.errors for v in viewers),
        "events": sum(v.events for v in viewers),
        "update_latencies": latencies,
        "deliveries": sorted(x for v in viewers for x in v.deliveries),
        "loads": sorted(loads),
        "load_phases": {phase: sorted(values) for phase, values in phases.items()},
        "load_tiles": {name: sorted(values) for name, values in tile_seconds.items()},
        "load_errors": load_errors,
        "sql_latencies": sorted(sql_latencies),
        "sql_errors": sql_errors,
    }


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(main(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
