"""``headrace demo`` as a real process: it comes up, its printed URLs answer, it stops cleanly.

Runs ``headrace demo --duration 25`` (small history) as a subprocess and,
while it runs, calls every URL it printed: the health and metrics
endpoints, the OpenAPI document, the login with the printed one-time
password, the dashboard page and every tile's data (no tile may fail), the
SQL editor page and the SQL API, and the throwaway PostgreSQL through the
printed DSN. Then the process must exit 0 by itself and leave nothing
behind: no server process of its cluster, no temporary directory.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import psycopg

HEADRACE = [sys.executable, "-c", "from headrace.cli.entry import main; main()"]
LINK = re.compile(r"^\s+([A-Za-z ]+): (.+)$")


class _Output:
    """The process's output lines, read on a thread (kept, and handed over as they come)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, pattern: str, timeout_s: float) -> str:
        """The first line (from now on) matching ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout_s} s; output so far:\n"
            + "\n".join(self.lines)
        )

    def text(self) -> str:
        self._thread.join(10)
        return "\n".join(self.lines)


def _facts(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        match = LINK.match(line)
        if match:
            out[match.group(1).strip()] = match.group(2).strip()
    return out


def _cluster_processes(cluster_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(cluster_dir in part for part in cmdline):
            found.append(process)
    return found


def _check_while_running(facts: dict[str, str]) -> None:
    base = facts["server"]
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").status_code == 200
        metrics = client.get(facts["metrics"].removeprefix(base))
        assert metrics.status_code == 200
        assert "headrace" in metrics.text
        assert client.get(facts["API"].removeprefix(base)).status_code == 200
        dashboard_path = facts["dashboard"].removeprefix(base)
        assert client.get(dashboard_path).status_code == 303  # to the login page
        match = re.match(r"(\S+) / (\S+)", facts["login"])
        assert match, facts["login"]
        login = client.post(
            "/api/login", json={"username": match.group(1), "password": match.group(2)}
        )
        assert login.status_code == 200, login.text
        csrf = login.json()["csrf"]
        assert client.get(dashboard_path).status_code == 200
        assert client.get(facts["SQL editor"].removeprefix(base)).status_code == 200
        name = dashboard_path.rsplit("/", 1)[-1]
        data = client.get(f"/api/dashboards/{name}/data", params={"range": "30d"})
        assert data.status_code == 200, data.text
        document = data.json()
        tiles = document.get("tiles", document)
        errors = {
            tile: entry["error"]
            for tile, entry in (tiles.items() if isinstance(tiles, dict) else [])
            if isinstance(entry, dict) and entry.get("error")
        }
        assert not errors, json.dumps(errors, indent=1)
        assert '"transactions"' in data.text
        # Drill-down applies every dimension, the looked-up ones (tier, merchant's
        # category and country) through the mirror's lookup columns.
        every = {f"f.{d}": "x" for d in ("merchant_category", "merchant_country", "channel")}
        every |= {f"f.{d}": "x" for d in ("currency", "account_tier", "tx_type", "status")}
        drill = client.get(
            f"/api/dashboards/{name}/tiles/tx_per_5m/drill",
            params={"bucket": "2026-01-01T00:00:00+00:00", **every},
        )
        assert drill.status_code == 200, drill.text
        assert drill.json()["ignored_filters"] == []
        answer = client.post(
            "/api/sql",
            json={"sql": "SELECT sum(tx_count) AS n FROM rollup.tx_1d"},
            headers={"X-CSRF-Token": csrf},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["rows"][0][0] > 0
    dsn = facts["psql"].removeprefix("psql ").strip('"')
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM transactions").fetchone()
        assert row is not None
        assert int(str(row[0])) > 0


def test_demo_runs_answers_and_leaves_nothing_behind() -> None:
    env = dict(os.environ)
    process = subprocess.Popen(
        [
            *HEADRACE,
            "demo",
            "--months",
            "1",
            "--customers",
            "1500",
            "--rate",
            "40",
            "--port",
            "0",
            "--duration",
            "25",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output = _Output(process)
    try:
        output.until(r"^Ctrl-C stops everything", 150)
        facts = _facts(output.lines)
        for what in ("server", "dashboard", "SQL editor", "API", "metrics", "psql", "login"):
            assert what in facts, (what, output.lines)
        cluster_dir = re.search(r"cluster in (\S+)", facts["postgres"])
        workdir = re.search(r"DuckDB (\S+)/bank\.duckdb", facts["pipeline"])
        assert cluster_dir, facts
        assert workdir, facts
        output.until(r"^live: .*streaming", 60)
        try:
            _check_while_running(facts)
        except (AssertionError, httpx.HTTPError, psycopg.Error) as exc:
            raise AssertionError(
                f"{exc!r}\nexit code {process.poll()}; demo output:\n" + "\n".join(output.lines)
            ) from exc
        assert process.wait(timeout=120) == 0, output.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        text = output.text()
        if process.stdout is not None:
            process.stdout.close()
    assert "stopped: PostgreSQL, pipeline and dashboard are down" in text, text
    assert "Traceback" not in text, text
    assert not _cluster_processes(cluster_dir.group(1)), "a server process of the demo is left"
    assert not Path(cluster_dir.group(1)).exists()
    assert not Path(workdir.group(1)).exists()


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [*HEADRACE, "demo", "--months", "1", "--customers", "300", "--rate", "20", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    output = _Output(process)
    try:
        output.until(r"^Ctrl-C stops everything", 150)
        facts = _facts(output.lines)
        cluster_dir = re.search(r"cluster in (\S+)", facts["postgres"])
        workdir = re.search(r"DuckDB (\S+)/bank\.duckdb", facts["pipeline"])
        assert cluster_dir, facts
        assert workdir, facts
        output.until(r"^live: .*streaming", 60)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0, output.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        text = output.text()
        if process.stdout is not None:
            process.stdout.close()
    assert "stopped: PostgreSQL, pipeline and dashboard are down" in text, text
    assert "Traceback" not in text, text
    assert not _cluster_processes(cluster_dir.group(1)), "a server process of the demo is left"
    assert not Path(cluster_dir.group(1)).exists()
    assert not Path(workdir.group(1)).exists()
