"""``make demo`` / ``headrace demo``: the whole reference deployment on this machine, end to end.

What runs, in one process (so Ctrl-C stops all of it)::

    ThrowawayPostgres (server processes, own temp dir)
      ├─ history loaded with COPY (months of past data)
      └─ Workload.run on a thread: the live fintech workload with fraud scenarios
    Runner on a thread (``headrace run --serve`` in-process):
      snapshot of every table → stream (pgoutput) → engine → DuckDB store
      └─ HTTP server: dashboard, SQL editor, API, /metrics
    main thread: the live view (rich), until Ctrl-C / SIGTERM or --duration

Teardown, in reverse order and also after a failure: the generator stops
after its current commit, the pipeline finishes and confirms its batch and
stops the server, PostgreSQL is stopped, and every temporary directory is
removed. Nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console

from headrace.demo.config import HistorySettings, PopulationSettings, WorkloadSettings
from headrace.demo.demo_view import DemoDisplay, DemoFacts, LiveFigures
from headrace.demo.deployment import Deployment, render_deployment
from headrace.demo.generator import Workload
from headrace.demo.history import load_history
from headrace.errors import ConfigError
from headrace.run.runner import Runner
from headrace.run.settings import RunSettings
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.serve.settings import ServeSettings
from headrace.serve.users import Role, UserStore

log = logging.getLogger("headrace.demo")

DATABASE = "bank"
"""Name of the demo database inside the throwaway cluster."""
ADMIN = "admin"


@dataclass(frozen=True)
class DemoSettings:
    """What ``headrace demo`` runs (the CLI options)."""

    rate: float = 40.0
    """New transactions per second (steady: no daily rhythm in the demo)."""
    seed: int = 1
    """Seeds the history and the live workload."""
    port: int = 8321
    """TCP port of the dashboard on 127.0.0.1 (0 picks a free one)."""
    months: int = 1
    """Months of history loaded before the live workload starts."""
    customers: int = 10_000
    """Customers of the simulated bank (accounts are about 1.2x)."""
    duration: float | None = None
    """Stop by itself after this many seconds of live workload (tests, CI); None: Ctrl-C."""
    fraud_every: int = 200
    """One labelled fraud scenario per this many transactions."""
    host: str = "127.0.0.1"
    """Address the dashboard listens on."""

    def __post_init__(self) -> None:
        problems = []
        if self.rate <= 0:
            problems.append(f"--rate must be positive, got {self.rate}")
        if self.months < 1:
            problems.append(f"--months must be at least 1, got {self.months}")
        if self.customers < 10:
            problems.append(f"--customers must be at least 10, got {self.customers}")
        if self.duration is not None and self.duration <= 0:
            problems.append(f"--duration must be positive, got {self.duration}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be 0-65535, got {self.port}")
        if problems:
            raise ConfigError("; ".join(problems), "see headrace demo --help")


@dataclass
class _Threads:
    """The demo's worker threads and the first error any of them hit."""

    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, name: str, target: Callable[[], object]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the main thread, which stops all
                self.errors.append(exc)
                self.stop.set()

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


class Demo:
    """One run of the demo (see the module docstring). Call :meth:`run` from the main thread."""

    def __init__(self, settings: DemoSettings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console()
        self.display = DemoDisplay(self.console)
        self.threads = _Threads()
        self.workdir: Path | None = None
        self.postgres: ThrowawayPostgres | None = None
        self.workload: Workload | None = None
        self.runner: Runner | None = None
        self._live = False
        self._token: str | None = None
        self._log_handlers: list[logging.Handler] = []

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        """Set everything up, show the live view until stopped, tear everything down."""
        with self._signals(), self._logging():
            try:
                self._setup()
                if not self.threads.stop.is_set():
                    self._live = True
                    self._watch()
                self.threads.raise_first()
            except KeyboardInterrupt:
                self.console.print("stopping ...")
            finally:
                self._live = False
                self._teardown()
        self.threads.raise_first()

    @contextlib.contextmanager
    def _logging(self) -> Iterator[None]:
        """Warnings and errors on the console (above the live view), headrace's info in a
        log file of the demo's temporary directory while it runs."""
        from rich.logging import RichHandler  # noqa: PLC0415

        handler = RichHandler(console=self.console, show_path=False, rich_tracebacks=False)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root = logging.getLogger()
        package = logging.getLogger("headrace")
        saved = (root.level, package.level)
        root.addHandler(handler)
        package.setLevel(logging.INFO)
        self._log_handlers = [handler]
        try:
            yield
        finally:
            for each in self._log_handlers:
                root.removeHandler(each)
                each.close()
            root.setLevel(saved[0])
            package.setLevel(saved[1])

    def _log_to_file(self, path: Path) -> None:
        handler = logging.FileHandler(path)
        handler.setLevel(logging.INFO)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(handler)
        self._log_handlers.append(handler)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the demo: at once while setting up, cleanly once live."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.threads.stop.set()
            if not self._live:
                raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ---------------------------------------------------------------- setup

    def _setup(self) -> None:
        s = self.settings
        self.workdir = Path(tempfile.mkdtemp(prefix="headrace-demo-"))
        self._log_to_file(self.workdir / "demo.log")
        self.display.step("starting a throwaway PostgreSQL")
        self.postgres = ThrowawayPostgres()
        self.postgres.start()
        with psycopg.connect(self.postgres.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        dsn = self.postgres.dsn(DATABASE)
        self.display.step(f"loading {s.months} month(s) of history for {s.customers:,} customers")
        report = load_history(
            HistorySettings(
                dsn=dsn,
                seed=s.seed,
                months=s.months,
                population=PopulationSettings(customers=s.customers),
            ),
            self.display.history_progress(),
        )
        rows = sum(report.rows.values())
        self.display.step(f"history: {rows:,} rows in {report.seconds:.1f} s")
        deployment = render_deployment(
            dsn, self.workdir / "bank.duckdb", self.workdir / "headrace.yaml"
        )
        serve = self._serve_settings(deployment)
        password = self._create_admin(serve)
        self.runner = Runner(
            deployment.pipeline,
            settings=RunSettings(heartbeat_interval_s=2.0),
            config_path=deployment.path,
            display=self.display,
            serve=serve,
        )
        runner = self.runner
        self.threads.start("headrace-demo-pipeline", runner.run)
        self._wait(lambda: runner.server_url is not None, "the dashboard to start")
        self.display.step("snapshot: copying every table into the store")
        self._wait(lambda: runner.state.phase == "streaming", "the snapshot")
        snapshot = runner.state.snapshot
        if snapshot is not None:
            self.display.step(
                f"snapshot: {snapshot.rows or 0:,} rows in {snapshot.seconds:.1f} s "
                "(copied, mirrored, rollups and rules built); streaming"
            )
        self.workload = Workload(
            WorkloadSettings(
                dsn=dsn,
                seed=s.seed,
                rate=s.rate,
                diurnal_amplitude=0.0,
                fraud_every=s.fraud_every,
                population=PopulationSettings(customers=s.customers),
            )
        ).open()
        workload = self.workload
        self.threads.start(
            "headrace-demo-generator",
            lambda: workload.run(self.threads.stop),
        )
        self.display.facts = DemoFacts(
            url=str(runner.server_url),
            dsn=dsn,
            postgres_version=self._server_version(dsn),
            cluster_dir=self.postgres.root,
            workdir=self.workdir,
            rate=s.rate,
            seed=s.seed,
            admin=ADMIN,
            password=password,
            history_rows=rows,
            dashboard=deployment_dashboard(serve),
        )
        self._token = self._api_token(serve)

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        while not condition():
            self.threads.raise_first()
            if self.threads.stop.is_set():
                raise KeyboardInterrupt
            time.sleep(0.05)

    def _serve_settings(self, deployment: Deployment) -> ServeSettings:
        data: dict[str, Any] = {
            **deployment.serve,
            "store": deployment.pipeline.store.path,
            "host": self.settings.host,
            "port": self.settings.port,
        }
        return ServeSettings.model_validate(data)

    def _create_admin(self, serve: ServeSettings) -> str:
        users = UserStore(serve.users_path)
        try:
            return users.add(ADMIN, Role.ADMIN)
        finally:
            users.close()

    def _api_token(self, serve: ServeSettings) -> str:
        """A token for the live view's own API calls (alerts by rule)."""
        users = UserStore(serve.users_path)
        try:
            return users.create_token(ADMIN, "headrace demo live view")[1]
        finally:
            users.close()

    @staticmethod
    def _server_version(dsn: str) -> str:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    # ------------------------------------------------------------- live view

    def _watch(self) -> None:
        started = time.monotonic()
        deadline = started + self.settings.duration if self.settings.duration else None
        with self.display.live_view():
            while not self.threads.stop.is_set():
                self.display.figures = self._figures()
                self.display.refresh()
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self.threads.stop.wait(1.0)

    def _figures(self) -> LiveFigures:
        runner, workload = self.runner, self.workload
        figures = LiveFigures()
        if workload is not None:
            stats = workload.stats
            figures.transactions = stats.transactions
            figures.generated_changes = stats.changes
            figures.scenarios = dict(stats.scenarios)
        if runner is not None:
            figures.document = dict(self.display.document)
            figures.position = runner.state.position
        figures.alerts_by_rule = self._alerts_by_rule()
        return figures

    def _alerts_by_rule(self) -> dict[str, int] | None:
        """Alerts per rule from the store, through the SQL API (None when unavailable)."""
        runner = self.runner
        if runner is None or runner.server_url is None or self._token is None:
            return None
        body = json.dumps(
            {"sql": "SELECT rule, count(*) AS n FROM headrace.alerts GROUP BY rule ORDER BY rule"}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - our own loopback server
            f"{runner.server_url}/api/sql",
            data=body,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                document = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, ValueError):
            return None
        return {str(rule): int(n) for rule, n in document.get("rows", [])}

    # --------------------------------------------------------------- teardown

    def _teardown(self) -> None:
        self.threads.stop.set()
        runner = self.runner
        for thread in self.threads.threads:
            if thread.name == "headrace-demo-generator":
                thread.join(30)
        if self.workload is not None:
            with contextlib.suppress(Exception):
                self.workload.close()
        if runner is not None:
            runner.stop.set()
        for thread in self.threads.threads:
            thread.join(60)
        self.display.close()
        if self.postgres is not None:
            self.postgres.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        alive = [t.name for t in self.threads.threads if t.is_alive()]
        if alive:
            log.warning("threads still running at exit: %s", ", ".join(alive))
        self.console.print(
            "stopped: PostgreSQL, pipeline and dashboard are down; temp files removed"
        )


def deployment_dashboard(serve: ServeSettings) -> str:
    """Name of the dashboard the demo opens first."""
    return serve.dashboards[0].name if serve.dashboards else "overview"


def run_demo(settings: DemoSettings, console: Console | None = None) -> None:
    """Run the demo until Ctrl-C (or ``settings.duration``); raises :class:`HeadraceError`."""
    Demo(settings, console).run()
