"""A first ``headrace run`` checks the source before it creates a slot: clear errors,
never a traceback, and no slot left behind holding WAL."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.errors import SourceError
from headrace.sandbox.postgres import free_port
from headrace.source.postgres.connect_errors import ConnectionLostError, connect_sql
from tests.conftest import PgDatabase
from tests.run.pipeline import headrace


def test_first_run_against_a_server_that_is_not_there(tmp_path: Path) -> None:
    path = tmp_path / "headrace.yaml"
    path.write_text(
        "source:\n"
        f'  dsn: "postgresql://nobody@127.0.0.1:{free_port()}/bank"\n'
        "  tables:\n    transactions: {}\n"
        f'store:\n  path: "{tmp_path / "data" / "store.duckdb"}"\n'
    )
    ran = headrace("run", "--config", str(path))
    assert ran.returncode != 0
    assert "cannot connect to the source database" in ran.stderr, ran.stderr
    assert "source.dsn" in ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout


def test_a_missing_database_is_final_and_named(pg_db: PgDatabase) -> None:
    dsn = pg_db.cluster.dsn("no_such_database")
    with pytest.raises(SourceError, match="does not exist") as caught:
        connect_sql(dsn)
    assert not isinstance(caught.value, ConnectionLostError)
    assert "DSN" in caught.value.fix


def test_columns_the_pipeline_names_are_checked_before_a_slot_exists(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    pg_db.execute("CREATE TABLE t (id int PRIMARY KEY, v text, at timestamptz)")
    path = tmp_path / "headrace.yaml"
    path.write_text(
        f'source:\n  dsn: "{pg_db.dsn}"\n  slot: s_checked\n  publication: p_checked\n'
        "  tables:\n    t: {event_time: nope}\n"
        f'store:\n  path: "{tmp_path / "store.duckdb"}"\n'
        "rollups:\n  - name: r\n    table: t\n    grain: 5m\n    dimensions: [vv]\n"
        "    measures: [{name: n, fn: count}]\n"
    )
    ran = headrace("run", "--config", str(path))
    assert ran.returncode != 0
    assert "3 problems" in ran.stderr, ran.stderr
    assert "no column 'nope'" in ran.stderr
    assert "no column 'vv'" in ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout
    assert pg_db.fetchall("SELECT 1 FROM pg_replication_slots WHERE slot_name = 's_checked'") == []
