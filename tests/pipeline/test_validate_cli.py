"""``headrace validate`` offline and against a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from headrace.cli.main import app
from headrace.sandbox.postgres import free_port
from tests.conftest import PgDatabase

PIPELINE = """\
source:
  dsn: "{dsn}"
  tables:
    accounts: {{}}
    transactions: {{event_time: created_at}}
rollups:
  - name: vol
    table: transactions
    grain: 5m
    coarser: [1h]
    dimensions:
      - status
      - name: tier
        lookup: {{table: accounts, on: account_id, column: tier}}
    measures:
      - {{name: n, fn: count}}
      - {{name: volume, fn: sum, column: {amount}}}
"""


def write(tmp_path: Path, dsn: str = "postgresql://nowhere/x", amount: str = "amount") -> Path:
    path = tmp_path / "headrace.yaml"
    path.write_text(PIPELINE.format(dsn=dsn, amount=amount))
    return path


def test_offline_ok(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", "--config", str(write(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "ok: 2 table(s), 1 rollup(s)" in result.output
    assert "rollup vol on transactions: grains 5m, 1h" in result.output


def test_offline_mistake(tmp_path: Path) -> None:
    path = write(tmp_path)
    path.write_text(path.read_text().replace("grain: 5m", "grain: 5"))
    result = CliRunner().invoke(app, ["validate", "--config", str(path)])
    assert result.exit_code == 1
    assert f"{path}:9: rollups[0].grain: not a duration" in result.output
    assert "what to do:" in result.output


def test_against_the_source(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, tier text);"
        "CREATE TABLE transactions (id int PRIMARY KEY, account_id int, amount numeric,"
        " status text, created_at timestamptz)"
    )
    good = write(tmp_path, pg_db.dsn.replace('"', ""))
    result = CliRunner().invoke(app, ["validate", "--config", str(good), "--connect"])
    assert result.exit_code == 0, result.output
    bad = write(tmp_path, pg_db.dsn, amount="amont")
    result = CliRunner().invoke(app, ["validate", "--config", str(bad), "--connect"])
    assert result.exit_code == 1
    assert "rollups[0].measures[1].column: no column 'amont' in transactions" in result.output
    assert "allowed: id, account_id, amount, status, created_at" in result.output


def test_a_server_not_ready_is_noted(pg_db: PgDatabase, tmp_path: Path) -> None:
    """The file is right, the user cannot replicate: validate says so, and passes."""
    pg_db.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, tier text);"
        "CREATE TABLE transactions (id int PRIMARY KEY, account_id int, amount numeric,"
        " status text, created_at timestamptz);"
        "CREATE ROLE validator LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO validator"
    )
    path = write(tmp_path, f"{pg_db.dsn} user=validator")
    result = CliRunner().invoke(app, ["validate", "--config", str(path), "--connect"])
    assert result.exit_code == 0, result.output
    assert "ok: 2 table(s), 1 rollup(s)" in result.stdout
    assert "note: headrace run would stop here: the user validator has no REPLICATION" in (
        result.stderr
    )


def test_against_a_source_that_is_not_there(tmp_path: Path) -> None:
    dsn = f"postgresql://nobody@127.0.0.1:{free_port()}/bank"
    path = write(tmp_path, dsn)
    result = CliRunner().invoke(app, ["validate", "--config", str(path), "--connect"])
    assert result.exit_code == 1
    assert "cannot connect to the source database" in result.output
    assert "--offline" in result.output
