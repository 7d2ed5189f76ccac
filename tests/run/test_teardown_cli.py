"""``headrace teardown`` against a real PostgreSQL: the slot goes (the publication only
when asked), a slot in use is refused, and nothing happens without confirmation."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headrace.cli.main import app
from headrace.sandbox.postgres import find_bindir
from tests.conftest import PgDatabase

PIPELINE = """\
source:
  dsn: "{dsn}"
  publication: pub_td
  slot: slot_td
  tables:
    items: {{}}
store:
  path: "{store}"
"""


@pytest.fixture
def config(pg_db: PgDatabase, tmp_path: Path) -> Path:
    pg_db.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    pg_db.execute("CREATE PUBLICATION pub_td FOR TABLE items")
    pg_db.execute("SELECT pg_create_logical_replication_slot('slot_td', 'pgoutput')")
    pg_db.execute("INSERT INTO items SELECT i, 'x' FROM generate_series(1, 100) i")
    path = tmp_path / "headrace.yaml"
    path.write_text(PIPELINE.format(dsn=pg_db.dsn, store=tmp_path / "store.duckdb"))
    return path


def teardown(config: Path, *args: str, answer: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["teardown", "--config", str(config), *args], input=answer)
    return result.exit_code, result.stdout, result.stderr


def slots(pg_db: PgDatabase) -> list[tuple[object, ...]]:
    return pg_db.fetchall("SELECT slot_name FROM pg_replication_slots WHERE slot_name = 'slot_td'")


def publications(pg_db: PgDatabase) -> list[tuple[object, ...]]:
    return pg_db.fetchall("SELECT pubname FROM pg_publication WHERE pubname = 'pub_td'")


def test_drops_the_slot_and_keeps_the_publication(pg_db: PgDatabase, config: Path) -> None:
    code, out, err = teardown(config, "--yes")
    assert code == 0, err
    assert "replication slot slot_td on database" in out
    assert "of WAL" in out
    assert "dropped replication slot slot_td" in out
    assert "kept publication pub_td (drop it too with --publication)" in out
    assert slots(pg_db) == []
    assert publications(pg_db) == [("pub_td",)]

    code, out, err = teardown(config, "--yes", "--publication")
    assert code == 0, err
    assert "no replication slot slot_td on database" in out
    assert "dropped publication pub_td" in out
    assert publications(pg_db) == []


def test_asks_before_dropping(pg_db: PgDatabase, config: Path) -> None:
    code, out, _ = teardown(config, answer="n\n")
    assert code == 1
    assert "will no longer be able to resume" in out
    assert slots(pg_db) == [("slot_td",)]
    code, out, _ = teardown(config, answer="y\n")
    assert code == 0
    assert slots(pg_db) == []


@pytest.fixture
def reader(pg_db: PgDatabase, config: Path) -> Iterator[None]:
    """pg_recvlogical streaming from the slot: the slot is in use."""
    process = subprocess.Popen(
        [
            str(find_bindir() / "pg_recvlogical"),
            "--dbname",
            pg_db.dsn,
            "--slot",
            "slot_td",
            "--start",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=pub_td",
            "-f",
            "/dev/null",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while not pg_db.fetchall(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'slot_td' AND active"
        ):
            assert time.monotonic() < deadline, "pg_recvlogical did not start"
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.usefixtures("reader")
def test_a_slot_in_use_is_refused(pg_db: PgDatabase, config: Path) -> None:
    code, _, err = teardown(config, "--yes")
    assert code == 1
    assert "the slot slot_td is in use by server process" in err
    assert "stop that process first" in err
    assert slots(pg_db) == [("slot_td",)]
