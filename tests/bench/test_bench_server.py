"""``headrace bench pipeline --server DSN``: the benchmark against a PostgreSQL it did not
start (here the test session's real cluster, standing in for a server elsewhere).

The run works in a database of its own there and leaves nothing behind: no database, no
replication slot. The server's CPU is not measured (it is another machine's), so it is
absent from the CPU figures rather than reported as zero.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import psycopg
import pytest
from rich.console import Console

from headrace.bench.pipeline import run
from headrace.bench.server import DATABASE_PREFIX, BenchServerError, ExternalPostgres
from headrace.bench.snapshot import run as snapshot_bench
from headrace.errors import ConfigError
from headrace.sandbox.postgres import ThrowawayPostgres, free_port, throwaway_postgres


def _leftovers(cluster: ThrowawayPostgres) -> tuple[list[object], list[object]]:
    """The benchmark databases and their slots still on the server."""
    like = f"{DATABASE_PREFIX}%"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        databases = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)
        ).fetchall()
        slots = conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database LIKE %s", (like,)
        ).fetchall()
    return [row[0] for row in databases], [row[0] for row in slots]


def test_live_run_against_a_named_server_leaves_nothing_there(
    pg_cluster: ThrowawayPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(rate=2_000, seconds=3, base_rows=5_000, writers=2, server=pg_cluster.dsn())
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == json.loads(json.dumps(asdict(result)))
    assert result.server == "external"
    assert result.connection == "server"
    assert f"in database {DATABASE_PREFIX}" in " ".join(printed.split())
    assert result.written_changes > 0
    assert result.mismatches == 0
    assert result.checked_views == 5
    assert result.freshness_p99_ms is not None
    # The server's CPU is another machine's: not measured, not shown as 0.
    assert set(result.cpu_us_per_change) == {"generator", "headrace"}
    assert set(result.cpu_waits) == {"headrace"}
    assert "CPU per change, in µs: generator" in printed
    assert _leftovers(pg_cluster) == ([], [])


def test_backlog_against_a_named_server_drops_its_slots_too(
    pg_cluster: ThrowawayPostgres,
) -> None:
    # The backlog mode makes a second slot (pg_recvlogical's copy) in the database.
    result = run(
        rate=2_000, seconds=2, base_rows=2_000, writers=2, backlog=True, server=pg_cluster.dsn()
    )
    assert result.mismatches == 0
    figures = result.backlog
    assert figures is not None
    assert figures.changes == result.written_changes > 0
    assert set(figures.cpu_cores) == {"headrace"}
    assert set(figures.peer_cpu_cores) == {"pg_recvlogical"}
    assert _leftovers(pg_cluster) == ([], [])


def test_a_server_without_logical_wal_is_refused_before_anything_is_made() -> None:
    with throwaway_postgres(wal_level="replica") as cluster:
        with pytest.raises(BenchServerError, match="wal_level=replica") as caught:
            run(rate=100, seconds=1, base_rows=10, server=cluster.dsn())
        assert "wal_level = logical" in caught.value.fix
        assert _leftovers(cluster) == ([], [])


def test_an_unreachable_server_says_where_it_looked() -> None:
    port = free_port()
    server = f"host=127.0.0.1 port={port} user=postgres password=secret"
    with pytest.raises(BenchServerError, match=f"127.0.0.1:{port} as postgres") as caught:
        ExternalPostgres(server).__enter__()
    assert "secret" not in str(caught.value)
    assert "pg_hba.conf" in caught.value.fix


def test_a_malformed_server_dsn_is_a_clear_error() -> None:
    with pytest.raises(BenchServerError, match="not a valid connection string"):
        ExternalPostgres("host=x port")


def test_tcp_and_server_together_are_refused(pg_cluster: ThrowawayPostgres) -> None:
    with pytest.raises(ConfigError, match="--tcp and --server"):
        run(rate=100, seconds=1, base_rows=10, tcp=True, server=pg_cluster.dsn())
    assert _leftovers(pg_cluster) == ([], [])


def test_snapshot_bench_against_a_named_server_leaves_nothing_there(
    pg_cluster: ThrowawayPostgres,
) -> None:
    out = io.StringIO()
    result = snapshot_bench(
        3000, 2, server=pg_cluster.dsn(), console=Console(file=out, width=200, highlight=False)
    )
    lines = out.getvalue().strip().splitlines()
    assert json.loads(lines[-1])["server"] == "external"
    assert result.store_rows_per_s > 0
    # Not measured, so 0.0, and the budget line says so.
    assert result.server_cpu_per_million_s == 0.0
    budget = next(line for line in lines if line.startswith("CPU per 1M rows end to end"))
    assert "server not measured" in budget
    assert _leftovers(pg_cluster) == ([], [])


def _fail_inside(server: ExternalPostgres) -> None:
    """Make the benchmark's database hold a table and a slot, then fail as a run would."""
    with server, psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (server.database,)
        )
        raise RuntimeError("the run failed")


def test_a_failed_run_still_drops_its_database(pg_cluster: ThrowawayPostgres) -> None:
    with pytest.raises(RuntimeError, match="the run failed"):
        _fail_inside(ExternalPostgres(pg_cluster.dsn()))
    assert _leftovers(pg_cluster) == ([], [])
