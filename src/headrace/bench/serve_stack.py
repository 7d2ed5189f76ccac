"""The system under test of ``headrace bench serve``: PostgreSQL → ``headrace run --serve``.

:class:`ServeStack` sets up, on a throwaway cluster, what a user of the
reference fintech deployment runs:

- PostgreSQL with the deployment's schema and a month of history;
- the deployment's pipeline file as shipped (rollups, fraud rules, health
  score, and the ``serve:`` section with its dashboard), rendered for that
  database and a DuckDB store in a temporary directory;
- an admin user and an API token for the load generators (the users file
  beside the store, as ``headrace user add`` writes it);
- ``headrace run --config ... --serve`` as a child process (embedded mode:
  pipeline and HTTP app in one process), observed through its status file;
- :class:`WriteLoad`: the fintech workload generator as another child
  process, paced at a number of changes/s, reporting what it wrote.

:class:`~headrace.bench.process_cpu.ProcessCpu` reads CPU seconds and RSS of a
process (and, for PostgreSQL, of its children) so the benchmark can say where the
two cores went.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import psycopg
from psycopg import sql

from headrace.bench.process_cpu import ProcessCpu, postgres_cpu
from headrace.bench.run_process import RunProcess
from headrace.bench.serve_workload import CHANGES_PER_TRANSACTION
from headrace.demo.config import HistorySettings, PopulationSettings
from headrace.demo.deployment import deployment_text
from headrace.demo.history import load_history
from headrace.pipeline.load import load_pipeline
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.serve.settings import ServeSettings, load_serve_settings
from headrace.serve.users import Role, UserStore

DATABASE = "bank"
_SERVING = re.compile(r"serving the live store on http://[^/\s]+:(\d+)")
BENCH_USER = "bench"


class HeadraceRun(RunProcess):
    """``headrace run --config CONFIG --serve`` as a child process.

    It listens on a port of its own choosing (``--port 0``: no race with other
    programs for a port picked beforehand), read back from its log.
    """

    def __init__(self, config: Path, store: Path, log_path: Path) -> None:
        super().__init__(config, store, log_path, ("--serve", "--port", "0"))
        self.port = 0

    def wait_streaming(self, timeout_s: float) -> dict[str, Any]:
        """Wait until the snapshot is done and the HTTP app answers; the status then.

        Sets :attr:`port` from the run's log line ``serving the live store on URL``.
        """
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline:
                document = self.status()
                if not self.port:
                    found = _SERVING.search(self.log_path.read_text())
                    self.port = int(found.group(1)) if found else 0
                if self.port and document.get("phase") == "streaming":
                    try:
                        if http.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                            return document
                    except httpx.HTTPError:
                        pass
                time.sleep(0.2)
        raise RuntimeError(f"headrace run did not start streaming within {timeout_s:.0f} s")


@dataclass
class WriteLoad:
    """The fintech workload generator as a child process (``serve_workload``)."""

    dsn: str
    changes_per_s: float
    customers: int
    seed: int = 1
    progress: list[dict[str, Any]] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None

    def start(self) -> WriteLoad:
        options = {
            "dsn": self.dsn,
            "seed": self.seed,
            "rate": self.changes_per_s / CHANGES_PER_TRANSACTION,
            "tick_ms": 50,
            "fraud_every": 2000,
            "customers": self.customers,
            "max_seconds": 3600,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "headrace.bench.serve_workload", json.dumps(options)],
            stdout=subprocess.PIPE,
            text=True,
        )
        stdout = self.process.stdout
        if stdout is None:
            raise RuntimeError("the write load has no output pipe")
        self._reader = threading.Thread(
            target=self._read, args=(stdout,), name="bench-write-load", daemon=True
        )
        self._reader.start()
        return self

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            if line.startswith("{"):
                self.progress.append(json.loads(line))

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the write load is not started")
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rate_between(self, start: float, end: float) -> tuple[float | None, float]:
        """Changes/s written between two ``time.monotonic()`` instants, and the generator's
        largest lag behind its pace (seconds) meanwhile."""
        inside = [p for p in self.progress if start <= p["t"] <= end]
        behind = max((float(p["behind_s"]) for p in inside), default=0.0)
        if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
            return None, behind
        first, last = inside[0], inside[-1]
        return (last["changes"] - first["changes"]) / (last["t"] - first["t"]), behind

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


class ServeStack:
    """PostgreSQL with the fintech deployment, ``headrace run --serve`` on it (see module doc).

    Use as a context manager; :meth:`start` sets everything up, leaving the
    database quiet (the write load is started by the caller).
    """

    def __init__(self, customers: int, workdir: Path | None = None) -> None:
        self.customers = customers
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="headrace-bench-serve-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.postgres = ThrowawayPostgres()
        self.dsn = ""
        self.history_rows = 0
        self.config = workdir / "headrace.yaml"
        self.store = workdir / "bench.duckdb"
        self.serve: ServeSettings | None = None
        self.token = ""
        self.run: HeadraceRun | None = None
        self.snapshot_seconds: float | None = None
        self.failed_log = ""
        """The end of ``headrace run``'s log when it exited with an error."""

    @property
    def serving(self) -> ServeSettings:
        """The serving settings ``headrace run --serve`` runs with (once started)."""
        if self.serve is None:
            raise RuntimeError("the stack is not started")
        return self.serve

    @property
    def headrace(self) -> HeadraceRun:
        """The ``headrace run --serve`` process (once started)."""
        if self.run is None:
            raise RuntimeError("the stack is not started")
        return self.run

    @property
    def url(self) -> str:
        return f"http://{self.serving.host}:{self.serving.port}"

    def start(self, say: Any = print) -> ServeStack:
        """PostgreSQL, history, the pipeline file, a token, ``headrace run --serve``."""
        self.postgres.start()
        with psycopg.connect(self.postgres.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        self.dsn = self.postgres.dsn(DATABASE, unix=True)
        started = time.monotonic()
        report = load_history(
            HistorySettings(
                dsn=self.dsn,
                months=1,
                population=PopulationSettings(customers=self.customers),
            )
        )
        self.history_rows = sum(report.rows.values())
        say(
            f"PostgreSQL {self.postgres.port}: {self.history_rows:,} rows of history "
            f"({self.customers:,} customers) in {time.monotonic() - started:.1f} s"
        )
        self.config.write_text(deployment_text(self.dsn, self.store))
        load_pipeline(self.config)  # fails here, clearly, if the deployment does not load
        serve = load_serve_settings(self.config, store=self.store, port=0)
        users = UserStore(serve.users_path)
        try:
            users.add(BENCH_USER, Role.ADMIN)
            _, self.token = users.create_token(BENCH_USER, "headrace bench serve")
        finally:
            users.close()
        self.run = HeadraceRun(self.config, self.store, self.workdir / "headrace.log")
        status = self.run.wait_streaming(timeout_s=600)
        self.serve = serve.model_copy(update={"port": self.run.port})
        self.snapshot_seconds = (status.get("snapshot") or {}).get("seconds")
        say(f"headrace run --serve on {self.url}: snapshot in {self.snapshot_seconds} s")
        return self

    def postgres_cpu(self) -> ProcessCpu:
        """The cluster's processes (postmaster and every backend, walsender included)."""
        return postgres_cpu(self.postgres.datadir)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "headrace.log"
        return path.read_text()[-chars:] if path.exists() else ""

    def close(self) -> int | None:
        """Stop ``headrace run`` and PostgreSQL, remove the files; the run's exit code."""
        code = None
        try:
            if self.run is not None:
                code = self.run.stop()
                self.run = None
                if code != 0:
                    self.failed_log = self.log_tail()
        finally:
            self.postgres.stop()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
        return code

    def __enter__(self) -> ServeStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
