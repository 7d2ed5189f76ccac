"""Hostile SQL: none succeeds, each gets a clear error, and the server keeps answering meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from headrace.serve.settings import SqlSettings
from tests.serve.conftest import Served

# Files the COPY/EXPORT attempts below would create if they ran.
TRAPS = [Path("/tmp/hr_pwn.csv"), Path("/tmp/hr_pwn.parquet"), Path("/tmp/hr_export")]  # noqa: S108

HOSTILE: list[str] = [
    # file and network reads
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM read_json('/etc/hosts')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM 'data.parquet'",
    "SELECT * FROM parquet_scan('x.parquet')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM parquet_metadata('x.parquet')",
    "SELECT * FROM read_ndjson_objects('/etc/hosts')",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
    "SELECT * FROM query_table('mirror.transactions')",
    "SELECT * FROM query('SELECT card_number FROM mirror.transactions')",
    "SELECT * FROM iceberg_scan('x')",
    "SELECT getenv('HOME')",
    # copy and export
    "COPY (SELECT 1) TO '/tmp/hr_pwn.csv'",
    "COPY mirror.transactions TO '/tmp/hr_pwn.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '/tmp/hr_export'",
    "COPY mirror.transactions FROM '/etc/passwd'",
    # attach
    "ATTACH '/tmp/hr_other.duckdb' AS other",
    "ATTACH ':memory:' AS m",
    "DETACH store",
    "USE memory",
    # extensions
    "INSTALL httpfs",
    "LOAD httpfs",
    "FORCE INSTALL httpfs",
    # settings and pragmas
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET memory_limit",
    "SET threads TO 64",
    "PRAGMA database_list",
    "PRAGMA enable_profiling",
    "SELECT current_setting('memory_limit')",
    "SELECT * FROM duckdb_settings()",
    "CALL pragma_version()",
    "CHECKPOINT",
    "VACUUM",
    # DDL and DML
    "CREATE TABLE mirror.evil AS SELECT 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO evil() AS 1",
    "DROP TABLE mirror.transactions",
    "DELETE FROM mirror.transactions",
    "UPDATE mirror.transactions SET amount = 0",
    "INSERT INTO headrace.alerts (id) VALUES (999)",
    "ALTER TABLE mirror.transactions ADD COLUMN x INTEGER",
    "TRUNCATE mirror.transactions",
    "WITH x AS (DELETE FROM mirror.transactions RETURNING *) SELECT count(*) FROM x",
    "SELECT * INTO evil FROM mirror.transactions",
    "BEGIN TRANSACTION",
    # several statements
    "SELECT 1; DROP TABLE mirror.transactions",
    "SELECT 1; SELECT 2",
    "SELECT 1;; ATTACH 'x'",
    "/* hi */ SELECT 1; COPY (SELECT 1) TO '/tmp/hr_pwn.csv'",
    # outside the visible store
    "SELECT * FROM headrace.users",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM pg_catalog.pg_tables",
    "SELECT * FROM rollup.tx_volume__state",
    "SUMMARIZE mirror.transactions",
    "DESCRIBE mirror.transactions",
    "PIVOT mirror.transactions ON currency USING sum(amount)",
]

# Queries that parse and pass the policy but would run forever or return too much.
RUNAWAY: list[str] = [
    "SELECT count(*) FROM range(100000000000)",
    "SELECT count(*) FROM range(1000000) a, range(1000000) b",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    "SELECT count(*) FROM mirror.transactions a, mirror.transactions b, mirror.transactions c, "
    "range(1000000) d",
    "EXPLAIN ANALYZE SELECT count(*) FROM range(100000000000)",
    "SELECT repeat('x', 10000) AS s FROM range(10000000)",
]


def test_corpus_is_large_enough() -> None:
    assert len(HOSTILE) + len(RUNAWAY) >= 50


def test_hostile_sql_never_succeeds_and_the_server_keeps_answering(
    serve: Callable[..., Served],
) -> None:
    served = serve(
        sql=SqlSettings(timeout_s=1.5, row_limit=1000, max_concurrent=2, max_result_bytes=8 * 2**20)
    )
    before = served.client("admin").post(
        "/api/sql", json={"sql": "SELECT count(*) AS n FROM mirror.transactions"}
    )
    assert before.status_code == 200
    for trap in TRAPS:
        assert not trap.exists()

    stop = threading.Event()
    latencies: list[float] = []

    def watch() -> None:
        with served.client("viewer") as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                assert client.get("/api/dashboards/payments/data").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)

    def attack(sql: str) -> tuple[str, httpx.Response]:
        with served.client("analyst") as client:
            return sql, client.post("/api/sql", json={"sql": sql})

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attack, HOSTILE + RUNAWAY))
    finally:
        stop.set()
        watcher.join()

    for sql, reply in results:
        assert reply.status_code in (400, 403, 408, 413), (sql, reply.status_code, reply.text)
        message = reply.json()["error"]
        assert len(message) > 15, (sql, message)
    runaway = {sql: reply for sql, reply in results if sql in RUNAWAY}
    for sql, reply in runaway.items():
        assert reply.status_code in (408, 413), (sql, reply.text)
        assert "cancelled" in reply.text or "larger than" in reply.text
    assert latencies
    assert max(latencies) < 2.0, latencies

    after = served.client("admin").post(
        "/api/sql", json={"sql": "SELECT count(*) AS n FROM mirror.transactions"}
    )
    assert after.json()["rows"] == before.json()["rows"]
    for trap in TRAPS:
        assert not trap.exists()
    assert served.client("analyst").post("/api/sql", json={"sql": "SELECT 42 AS x"}).json()[
        "rows"
    ] == [[42]]


def test_huge_result_is_cut_at_the_row_limit(served: Served) -> None:
    reply = served.client("analyst").post("/api/sql", json={"sql": "SELECT * FROM range(10000000)"})
    assert reply.status_code == 200
    body = reply.json()
    assert body["truncated"] is True
    assert len(body["rows"]) == served.settings.sql.row_limit


def test_cancel_a_running_query(served: Served) -> None:
    sql = "SELECT count(*) FROM range(100000000000)"

    def run() -> httpx.Response:
        with served.client("analyst") as client:
            return client.post("/api/sql", json={"sql": sql, "query_id": "longone"})

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run)
        time.sleep(0.4)
        with served.client("analyst") as client:
            cancelled = client.post("/api/sql/cancel", json={"query_id": "longone"}).json()
        reply = future.result()
    assert cancelled == {"cancelled": True}
    assert reply.status_code == 409
    assert "cancelled" in reply.json()["error"]
