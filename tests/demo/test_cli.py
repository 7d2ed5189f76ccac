"""``headrace demo``: help texts, and each command against a real database."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from headrace.cli.demo import demo_app
from headrace.cli.main import app
from tests.conftest import PgDatabase
from tests.demo.conftest import ledger_mismatches

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--help"],
        ["demo", "generate", "--help"],
        ["demo", "load-history", "--help"],
        ["demo", "schema", "--help"],
    ],
)
def test_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_demo_help_lists_the_parts() -> None:
    result = runner.invoke(demo_app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "load-history", "schema"):
        assert command in result.output


def test_schema_then_load_then_generate(pg_db: PgDatabase) -> None:
    dsn = ["--dsn", pg_db.dsn]
    result = runner.invoke(demo_app, ["schema", *dsn])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        demo_app, ["load-history", *dsn, "--months", "1", "--customers", "150", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "loaded 1 months of history" in result.output
    result = runner.invoke(
        demo_app,
        ["generate", *dsn, "--rate", "100", "--duration", "1.5", "--fraud-every", "30"],
    )
    assert result.exit_code == 0, result.output
    assert "txn/s" in result.output
    assert "stopped after" in result.output
    assert ledger_mismatches(pg_db.dsn) == []
    result = runner.invoke(demo_app, ["load-history", *dsn, "--customers", "10"])
    assert result.exit_code == 1
    assert "--replace" in result.output
    result = runner.invoke(demo_app, ["schema", *dsn, "--drop"])
    assert result.exit_code == 0, result.output
    assert pg_db.fetchall("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def test_generate_bootstraps_an_empty_database(pg_db: PgDatabase) -> None:
    result = runner.invoke(
        demo_app,
        [
            "generate",
            "--dsn",
            pg_db.dsn,
            "--rate",
            "50",
            "--duration",
            "0.5",
            "--customers",
            "100",
            "--anchor",
            "2026-01-01T00:00:00+00:00",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "generating from 2026-01-01 00:00:00" in result.output
    assert pg_db.fetchall("SELECT count(*) FROM customers") == [(100,)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--anchor", "yesterday"], "not an ISO 8601 time"),
        (["--anchor", "2026-01-01T00:00:00"], "no time zone"),
        (["--tick-ms", "0"], "tick_ms"),
    ],
)
def test_bad_input_is_explained(pg_db: PgDatabase, args: list[str], message: str) -> None:
    result = runner.invoke(demo_app, ["generate", "--dsn", pg_db.dsn, *args])
    assert result.exit_code == 1
    assert message in result.output


def test_unreachable_database_is_explained() -> None:
    result = runner.invoke(
        demo_app, ["schema", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2"]
    )
    assert result.exit_code == 1
    assert "cannot connect" in result.output


def test_ctrl_c_stops_cleanly(pg_db: PgDatabase) -> None:
    command = [
        sys.executable,
        "-c",
        "from headrace.cli.demo import demo_app; demo_app()",
        "generate",
        "--dsn",
        pg_db.dsn,
        "--rate",
        "100",
        "--customers",
        "200",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "generating from" in first, first
        assert "txn/s" in process.stdout.readline()  # a rate line: it is writing
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopped after" in output
    assert "Traceback" not in output
    assert ledger_mismatches(pg_db.dsn) == []
