"""The workload process of ``headrace bench fraud``: the fintech generator, paced, then drained.

Run as ``python -m headrace.bench.fraud_workload '<json options>'``. It runs
the demo's :class:`~headrace.demo.generator.Workload` (labelled fraud
scenarios injected every ``fraud_every`` transactions) paced to the wall
clock for ``seconds``, then drains it (every scheduled change written, so
no scenario is left half done), and prints one JSON line: what it wrote,
how fast, and the WAL position after its last commit (``end_lsn``).

Options: ``dsn``, ``seed``, ``rate`` (transactions per *simulated* second),
``speed`` (simulated seconds per wall second), ``tick_ms`` (simulated),
``fraud_every``, ``seconds`` (wall), ``anchor`` (ISO 8601, the simulated
clock's start), ``customers``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from headrace.bench.workload_process import dump_stacks_on_signal
from headrace.demo.config import HistorySettings, PopulationSettings, WorkloadSettings
from headrace.demo.generator import Workload
from headrace.demo.history import load_history
from headrace.errors import parse_lsn
from headrace.sandbox.postgres import ThrowawayPostgres


def bank_with_history(
    cluster: ThrowawayPostgres, *, customers: int, seed: int, seconds: float, speed: float
) -> tuple[str, datetime, int]:
    """A ``bank`` database on ``cluster`` with a month of fintech history, ready for a
    workload of ``seconds`` wall seconds at ``speed``: its DSN, the simulated clock's
    start (in the past: simulated time must not overtake the wall clock) and the
    history's rows."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE bank"))
    dsn = cluster.dsn("bank", unix=True)
    anchor = datetime.now(UTC) - timedelta(seconds=seconds * speed + 3600)
    report = load_history(
        HistorySettings(
            dsn=dsn,
            seed=seed,
            months=1,
            anchor=anchor,
            population=PopulationSettings(customers=customers),
        )
    )
    return dsn, anchor, sum(report.rows.values())


def options_for(
    *,
    dsn: str,
    rate: float,
    speed: float,
    seconds: float,
    anchor: datetime,
    customers: int,
    seed: int = 1,
    fraud_every: int = 1000,
) -> dict[str, Any]:
    """The workload's options for ``rate`` transactions per *wall* second."""
    return {
        "dsn": dsn,
        "seed": seed,
        "rate": rate / speed,
        "speed": speed,
        "tick_ms": max(50, int(20 * speed)),  # about 50 commits per wall second
        "fraud_every": fraud_every,
        "seconds": seconds,
        "anchor": anchor.isoformat(),
        "customers": customers,
    }


def settings_from(options: dict[str, Any]) -> WorkloadSettings:
    """The generator's settings from the JSON options."""
    return WorkloadSettings(
        dsn=str(options["dsn"]),
        seed=int(options.get("seed", 1)),
        rate=float(options["rate"]),
        speed=float(options.get("speed", 1.0)),
        tick_ms=int(options.get("tick_ms", 50)),
        fraud_every=int(options.get("fraud_every", 1000)),
        diurnal_amplitude=0.0,
        anchor=datetime.fromisoformat(str(options["anchor"])) if options.get("anchor") else None,
        population=PopulationSettings(customers=int(options.get("customers", 10_000))),
    )


def run(options: dict[str, Any]) -> dict[str, Any]:
    """Write the workload; returns the figures printed as JSON."""
    settings = settings_from(options)
    seconds = float(options["seconds"])
    with Workload(settings) as workload:
        started = time.monotonic()
        workload.run(threading.Event(), duration=seconds)
        paced = time.monotonic() - started
        paced_transactions = workload.stats.transactions
        workload.drain()
        drained = time.monotonic() - started - paced
        stats = workload.stats
        simulated_s = workload.simulated_seconds
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    end_lsn = parse_lsn(str(row[0])) if row else 0
    return {
        "transactions": stats.transactions,
        "changes": stats.changes,
        "commits": stats.commits,
        "scenarios": dict(stats.scenarios),
        "skipped": dict(stats.skipped),
        "envelope_breaches": stats.envelope_breaches,
        "paced_seconds": round(paced, 3),
        "drain_seconds": round(drained, 3),
        "transactions_per_s": round(paced_transactions / paced, 1) if paced > 0 else 0.0,
        "simulated_seconds": round(simulated_s, 1),
        "end_lsn": end_lsn,
    }


def main(argv: list[str]) -> None:
    """Entry point: one JSON argument in, one JSON line out."""
    dump_stacks_on_signal()  # the benchmark asks for the stacks if this runs late
    print(json.dumps(run(json.loads(argv[1]))), flush=True)


if __name__ == "__main__":
    main(sys.argv)
