"""A real pipeline for the run-loop tests: the bench workload's tables, several rollups."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import psycopg

from headrace.bench.pipeline_workload import Workload, create_schema, next_free_id
from headrace.pipeline.load import load_pipeline
from headrace.pipeline.model import PipelineConfig
from headrace.run.control import RunFiles, read_json
from headrace.run.runner import Runner, RunResult
from headrace.run.settings import RunSettings
from headrace.run.verify import compare_store, duplicate_history_rows
from tests.conftest import PgDatabase

PIPELINE_YAML = """
source:
  dsn: "{dsn}"
  slot: s_run
  publication: p_run
  tables:
    accounts: {{}}
    transactions:
      event_time: created_at
      history: true
store:
  path: "{store}"
rollups:
  - name: tx_volume
    table: transactions
    grain: 5m
    coarser: [1h]
    dimensions: [status]
    measures:
      - {{name: tx_count, fn: count}}
      - {{name: volume, fn: sum, column: amount}}
      - {{name: declined, fn: sum, column: amount, where: "status = 'declined'"}}
  - name: tx_merchant
    table: transactions
    grain: 1h
    dimensions: [merchant]
    measures:
      - {{name: n, fn: count}}
      - {{name: smallest, fn: min, column: amount}}
      - {{name: largest, fn: max, column: amount}}
      - {{name: mean, fn: avg, column: amount}}
  - name: tx_tier
    table: transactions
    grain: 1h
    dimensions:
      - name: tier
        lookup: {{table: accounts, on: account_id, column: tier}}
    measures:
      - {{name: accounts, fn: count_distinct, column: account_id}}
      - {{name: total, fn: sum, column: amount}}
"""

BASE_ROWS = 3_000


@dataclass
class Pipeline:
    """A pipeline file over a test database, and helpers to check its store."""

    db: PgDatabase
    path: Path
    config: PipelineConfig

    @property
    def files(self) -> RunFiles:
        return RunFiles(Path(self.config.store.path))

    def status(self) -> dict[str, object]:
        return read_json(self.files.status) or {}

    def write(self, rate: float, seconds: float, seed: int = 1) -> int:
        """Write the mixed workload; returns the WAL position after the last commit."""
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            workload = Workload(conn, first_id=next_free_id(conn), tx_rows=20, seed=seed)
            return workload.run(rate, seconds).end_lsn

    def assert_equal_to_postgres(self) -> None:
        """Mirrors and rollups equal PostgreSQL; history has no duplicate (lsn, seq)."""
        with psycopg.connect(self.db.dsn, autocommit=True) as pg:
            duck = duckdb.connect(self.config.store.path, read_only=True)
            try:
                comparison = compare_store(self.config, pg, duck)
                duplicates = duplicate_history_rows(self.config, duck)
            finally:
                duck.close()
        assert comparison.ok, comparison.describe()
        assert not any(duplicates.values()), duplicates


def make_pipeline(db: PgDatabase, tmp_path: Path, base_rows: int = BASE_ROWS) -> Pipeline:
    with db.connect() as conn:
        create_schema(conn, base_rows)
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE_YAML.format(dsn=db.dsn, store=tmp_path / "store.duckdb"))
    return Pipeline(db, path, load_pipeline(path))


@contextmanager
def running(
    pipeline: Pipeline, settings: RunSettings | None = None, **options: Any
) -> Iterator[tuple[Runner, list[RunResult]]]:
    """A :class:`Runner` in a thread until the block ends (then stopped and joined);
    ``options`` go to the runner (``serve``, ``replace_slot``)."""
    runner = Runner(
        pipeline.config,
        settings=settings or RunSettings(status_interval_s=0.2, heartbeat_interval_s=0.5),
        config_path=pipeline.path,
        **options,
    )
    results: list[RunResult] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(runner.run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-runner")
    thread.start()
    try:
        wait_until(lambda: runner.state.phase == "streaming" or bool(errors), 60)
        if errors:
            raise errors[0]
        yield runner, results
    finally:
        runner.stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the runner did not stop"
    if errors:
        raise errors[0]


def wait_until(condition: object, timeout_s: float, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_caught_up(runner: Runner, lsn: int, timeout_s: float = 60) -> None:
    wait_until(lambda: (runner.state.position or 0) >= lsn, timeout_s, f"position {lsn}")


# ------------------------------------------------------------- as a process

HEADRACE = [sys.executable, "-c", "from headrace.cli.entry import main; main()"]


@dataclass(frozen=True)
class Ran:
    """How a ``headrace`` command ended."""

    returncode: int
    stdout: str
    stderr: str


def headrace(*args: str) -> Ran:
    """Run a short ``headrace`` command (``status``, ``rebuild``) in this process, to its end
    (``headrace run`` itself runs as a child process: :class:`RunProcess`)."""
    from typer.testing import CliRunner  # noqa: PLC0415

    from headrace.cli.main import app  # noqa: PLC0415

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


_run_numbers = itertools.count()
STARTED: list[subprocess.Popen[bytes]] = []
"""Every ``headrace run`` a test started (the ``kill_leftovers`` fixture ends survivors)."""


class RunProcess:
    """``headrace run --config ...`` as a child process."""

    def __init__(self, pipeline: Pipeline, fault: str | None = None, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "HEADRACE_FAULT"}
        if fault:
            env["HEADRACE_FAULT"] = fault
        self.pipeline = pipeline
        self.log = pipeline.path.with_name(f"run-{next(_run_numbers)}.log")
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*HEADRACE, "run", "--config", str(pipeline.path), "--heartbeat-s", "0.5", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        STARTED.append(self.process)

    def output(self) -> str:
        return self.log.read_text()

    def wait_streaming(self, timeout_s: float = 60) -> None:
        def streaming() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"headrace run exited early:\n{self.output()}")
            status = self.pipeline.status()
            return status.get("phase") == "streaming" and status.get("pid") == self.process.pid

        wait_until(streaming, timeout_s, "streaming")

    def wait_position(self, lsn: int, timeout_s: float = 60) -> None:
        def reached() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"headrace run exited early:\n{self.output()}")
            status = self.pipeline.status()
            return status.get("pid") == self.process.pid and int(status.get("position") or 0) >= lsn  # type: ignore[call-overload]

        wait_until(reached, timeout_s, f"position {lsn}")

    def terminate(self, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.wait(30)

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)


class BackgroundWriter:
    """The mixed workload written from a thread until stopped; ``end_lsn`` once stopped."""

    def __init__(self, pipeline: Pipeline, rate: float, seed: int = 7) -> None:
        self.pipeline = pipeline
        self.rate = rate
        self.seed = seed
        self.end_lsn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="test-writer", daemon=True)
        self._error: BaseException | None = None

    def _write(self) -> None:
        try:
            with psycopg.connect(self.pipeline.db.dsn, autocommit=True) as conn:
                first = next_free_id(conn)
                workload = Workload(conn, first_id=first, tx_rows=10, seed=self.seed)
                while not self._stop.is_set():
                    workload.run(self.rate, 0.2)
                self.end_lsn = workload.run(self.rate, 0).end_lsn
        except BaseException as exc:
            self._error = exc

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise self._error
        return self.end_lsn

    def __exit__(self, *exc: object) -> None:
        self.stop()
