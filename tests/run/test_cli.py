"""``headrace run`` / ``status`` / ``rebuild`` as processes: clean stops, status, live rebuilds."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psycopg

from headrace.errors import parse_lsn
from headrace.run.preload import MALLOC_ENV, find_jemalloc
from tests.conftest import PgDatabase
from tests.run.pipeline import (
    BackgroundWriter,
    Pipeline,
    RunProcess,
    headrace,
    make_pipeline,
)


def slot_confirmed(pipeline: Pipeline) -> int:
    with psycopg.connect(pipeline.db.dsn, autocommit=True) as conn:
        row = conn.execute(
            b"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's_run'"
        ).fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def test_sigterm_finishes_the_batch_confirms_and_exits_zero(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    pipeline = make_pipeline(pg_db, tmp_path)
    run = RunProcess(pipeline)
    run.wait_streaming()
    with BackgroundWriter(pipeline, rate=2000):
        run.wait_position(0)
        status = pipeline.status()
        first = int(status["position"])  # type: ignore[call-overload]
        run.wait_position(first + 1)  # changes are flowing
        assert run.terminate() == 0, run.output()
    # The signal reached the process as started: `headrace` executes itself again in place
    # to run on jemalloc (headrace/run/preload.py) and keeps its PID.
    on = "jemalloc" if find_jemalloc() and os.environ.get(MALLOC_ENV) != "system" else "system"
    assert f"(C allocator: {on})" in run.output()
    # The store and the slot agree exactly: the last batch was committed, then confirmed.
    final = json.loads(headrace("status", "--config", str(pipeline.path), "--json").stdout)
    assert final["running"] is False
    assert final["position"] == slot_confirmed(pipeline)
    # Resume and drain: everything equals PostgreSQL.
    end = BackgroundWriter(pipeline, rate=2000, seed=8).__enter__().stop()
    run = RunProcess(pipeline)
    run.wait_position(end)
    assert run.terminate() == 0, run.output()
    pipeline.assert_equal_to_postgres()


def test_sigint_during_the_snapshot_stores_nothing(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=300_000)
    # Held at the first chunk until signalled: a fast machine must not finish the copy first.
    run = RunProcess(pipeline, "snapshot_chunk:1:hold")

    def copying() -> bool:
        status = pipeline.status()
        return status.get("phase") == "snapshot" and bool(status.get("snapshot"))

    from tests.run.pipeline import wait_until  # noqa: PLC0415

    wait_until(copying, 60, "the snapshot")
    run.process.send_signal(signal.SIGINT)
    assert run.wait(60) == 0, run.output()
    assert "the next run starts it over" in run.output()
    final = json.loads(headrace("status", "--config", str(pipeline.path), "--json").stdout)
    assert final["position"] is None
    with psycopg.connect(pipeline.db.dsn, autocommit=True) as conn:
        assert conn.execute(b"SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def test_status_while_running_and_after(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path)
    config = str(pipeline.path)
    empty = headrace("status", "--config", config, "--json")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["phase"] == "empty"
    assert "nothing loaded yet" in headrace("status", "--config", config).stdout
    run = RunProcess(pipeline)
    run.wait_streaming()
    with BackgroundWriter(pipeline, rate=1000):
        run.wait_position(int(pipeline.status()["position"]) + 1)  # type: ignore[call-overload]
        live = json.loads(headrace("status", "--config", config, "--json").stdout)
        assert live["running"] is True
        assert live["phase"] == "streaming"
        assert live["pid"] == run.process.pid
        tables = {t["name"]: t for t in live["tables"]}
        assert tables["public.transactions"]["rows"] >= 3000
        for field in ("rows", "last_commit_ts", "lag_ms", "lag_bytes", "batches_per_s"):
            assert field in tables["public.transactions"]
        assert {r["name"] for r in live["rollups"]} == {"tx_volume", "tx_merchant", "tx_tier"}
        assert set(live["store_checkpoints"]) == {"count", "seconds", "longest_s", "wal_bytes"}
        assert live["lossy_values"] == []  # the workload's values all convert exactly
        # The writer applied batches within the window: a share of it, never more than all.
        assert 0 < live["writer_busy"] <= 1
        text = headrace("status", "--config", config)
        assert text.returncode == 0, text.stderr
        for word in ("streaming", "public.transactions", "tx_merchant", "changes/s", "writer busy"):
            assert word in text.stdout
        # A second `headrace run` on the same store is refused while one runs.
        second = headrace("run", "--config", config)
        assert second.returncode == 1
        assert "in use by headrace run" in second.stderr
    assert run.terminate() == 0
    after = headrace("status", "--config", config)
    assert after.returncode == 0, after.stderr
    assert "idle" in after.stdout


def test_rebuild_while_streaming_and_offline(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path)
    config = str(pipeline.path)
    run = RunProcess(pipeline)
    run.wait_streaming()
    with BackgroundWriter(pipeline, rate=1500) as writer:
        # The definition changes (a new measure); the running pipeline rebuilds it in place.
        text = pipeline.path.read_text().replace(
            "      - {name: mean, fn: avg, column: amount}",
            "      - {name: mean, fn: avg, column: amount}\n"
            "      - {name: volume, fn: sum, column: amount}",
        )
        pipeline.path.write_text(text)
        answer = headrace("rebuild", "tx_merchant", "--config", config)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert "rebuilt tx_merchant" in answer.stdout
        unknown = headrace("rebuild", "nope", "--config", config)
        assert unknown.returncode == 1
        assert "no rollup named" in unknown.stderr
    end = writer.end_lsn
    run.wait_position(end)
    assert run.terminate() == 0, run.output()
    reloaded = make_reloaded(pipeline)
    reloaded.assert_equal_to_postgres()
    # With nothing running, the rebuild happens in the command itself.
    offline = headrace("rebuild", "tx_volume", "--config", config)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "rebuilt tx_volume" in offline.stdout
    reloaded.assert_equal_to_postgres()


def make_reloaded(pipeline: Pipeline) -> Pipeline:
    from headrace.pipeline.load import load_pipeline  # noqa: PLC0415

    return Pipeline(pipeline.db, pipeline.path, load_pipeline(pipeline.path))
