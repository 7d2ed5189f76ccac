"""``headrace init`` against a real PostgreSQL: the file it writes loads, validates
against the database, and says which tables it could not follow and why."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from headrace.cli.main import app
from headrace.pipeline.load import load_pipeline
from tests.conftest import PgDatabase

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, tier text, balance numeric(12,2),
                       opened_at timestamptz);
CREATE TABLE transactions (id bigint PRIMARY KEY, account_id int, amount numeric(12,2),
                           status text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE audit (what text, at timestamptz);
CREATE TABLE snapshots (taken date, payload jsonb);
ALTER TABLE snapshots REPLICA IDENTITY FULL;
CREATE TABLE "Odd" ("Key" int PRIMARY KEY, "on" timestamptz);
CREATE TABLE "two words" (id int PRIMARY KEY);
CREATE SCHEMA ops;
CREATE TABLE ops.jobs (id int PRIMARY KEY, state text);
INSERT INTO transactions SELECT i, i % 10, i, (ARRAY['ok', 'declined'])[1 + i % 2],
    now(), now() FROM generate_series(1, 500) i;
ANALYZE;
"""


def init(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["init", *args])
    return result.exit_code, result.stdout, result.stderr


def test_init_writes_a_pipeline_that_validates(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(SCHEMA)
    out = tmp_path / "headrace.yaml"
    code, _, err = init("--dsn", pg_db.dsn, "--schema", "public", "--schema", "ops", "-o", str(out))
    assert code == 0, err
    assert "wrote" in err
    assert "4 of 7 table(s) followed" in err
    text = out.read_text()
    # Tables it cannot follow are comments saying why and what to do.
    assert "# audit: not followed: no primary key or replica identity index" in text
    assert "# snapshots: not followed: no primary key (it has REPLICA IDENTITY FULL)" in text
    assert '# "two words": not followed: a space or a dot in its name' in text
    assert "note: public.audit is not followed" in err
    config = load_pipeline(out)
    tables = config.source.tables
    assert sorted(tables) == ["Odd", "accounts", "ops.jobs", "transactions"]
    assert tables["transactions"].event_time == "created_at"
    assert tables["accounts"].event_time == "opened_at"
    assert tables["ops.jobs"].event_time == "commit"
    assert tables["Odd"].event_time == "on"  # a YAML word, quoted
    (rollup,) = config.rollups
    assert rollup.table == "transactions"
    assert rollup.name == "transactions_activity"
    assert [d.name for d in rollup.dimensions] == ["status"]  # few values per the statistics
    assert [(m.name, m.fn.value, m.column) for m in rollup.measures] == [
        ("row_count", "count", None),
        ("sum_amount", "sum", "amount"),
    ]
    result = CliRunner().invoke(app, ["validate", "--config", str(out), "--connect"])
    assert result.exit_code == 0, result.output


def test_init_named_tables_and_stdout(pg_db: PgDatabase) -> None:
    pg_db.execute(SCHEMA)
    code, out, err = init("--dsn", pg_db.dsn, "--table", "accounts", "-t", "ops.jobs", "-o", "-")
    assert code == 0, err
    source = yaml.safe_load(out)["source"]
    assert set(source["tables"]) == {"accounts", "ops.jobs"}
    assert source["dsn"] == pg_db.dsn or "dbname=" in source["dsn"]

    code, _, err = init("--dsn", pg_db.dsn, "--table", "nowhere", "-o", "-")
    assert code == 1
    assert "no such table in database" in err
    assert "public.nowhere" in err


def test_init_keeps_passwords_out_and_files_safe(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(SCHEMA)
    out = tmp_path / "headrace.yaml"
    out.write_text("mine\n")
    code, _, err = init("--dsn", pg_db.dsn, "--output", str(out))
    assert code == 1
    assert "already exists" in err
    assert out.read_text() == "mine\n"

    # A password (ignored by the trust authentication of the test cluster) is not written.
    code, _, err = init("--dsn", f"{pg_db.dsn} password=s3cret", "--output", str(out), "--force")
    assert code == 0, err
    text = out.read_text()
    assert "s3cret" not in text
    assert "dsn_env: HEADRACE_DSN" in text
    assert "password is not written" in err


def test_init_reports_what_stops_a_run(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A user without REPLICATION still gets the file, and is told what to do."""
    pg_db.execute(SCHEMA)
    pg_db.execute("CREATE ROLE reader LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
    dsn = f"{pg_db.dsn} user=reader"
    code, _, err = init("--dsn", dsn, "--output", str(tmp_path / "h.yaml"))
    assert code == 0, err
    assert "no REPLICATION privilege" in err
    assert "ALTER ROLE reader WITH REPLICATION" in err


def test_init_unreachable_database_is_explained(tmp_path: Path) -> None:
    code, _, err = init("--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert code == 1
    assert "cannot connect to the source database" in err
    assert "what to do:" in err
