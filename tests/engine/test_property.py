"""The engine equals PostgreSQL: random changes → real pgoutput → batches → mirrors and rollups.

Random sequences of inserts, updates (including key-moving updates, updates
moving rows between buckets and dimension values, multi-row updates, and
updates leaving a TOASTed column unchanged), deletes and truncates on three
tables are written to PostgreSQL in random transactions, read back from a
logical slot as real pgoutput (proto 2), cut into batches at random
transaction boundaries by the real batcher, and applied by the engine (with
engine restarts in between). At the end every mirror and every grain of every
rollup equals the same query computed by PostgreSQL; a rebuild from the mirror
gives exactly the incrementally maintained state.

Looked-up dimension (the account's tier): the expected value per transaction
row is what PostgreSQL itself returned when the row version was written
(``RETURNING (SELECT tier FROM acct ...)``), an independent witness of the
"value at the time of the change" semantics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.engine import batch_changes, key_index
from headrace.source.postgres.batcher import PIECE_CHANGES, Batcher
from headrace.store.duckdb.schema import grain_label
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness, normalized, recorded_source

YAML = """
source:
  dsn: "DSN"
  tables:
    acct: {}
    tx:
      event_time: ts
      history: true
    pair:
      event_time: ts
      history: true
rollups:
  - name: txr
    table: tx
    grain: 15m
    coarser: [1h, 1d]
    dimensions:
      - status
      - name: size
        expr: "CASE WHEN amount >= 50 THEN 'big' ELSE 'small' END"
      - name: tier
        lookup: {table: acct, on: acct_id, column: tier}
    measures:
      - {name: n, fn: count}
      - {name: declined, fn: count, where: "status = 'declined'"}
      - {name: volume, fn: sum, column: amount}
      - {name: settled_volume, fn: sum, column: amount, where: "status <> 'declined'"}
      - {name: smallest, fn: min, column: amount}
      - {name: largest, fn: max, column: amount}
      - {name: mean, fn: avg, column: amount}
      - {name: accounts, fn: count_distinct, column: acct_id}
      - {name: accounts_approx, fn: approx_count_distinct, column: acct_id}
      - {name: notes, fn: count, column: note}
      - {name: note_chars, fn: sum, expr: "length(note)"}
      - {name: latest_declined, fn: max, column: ts, where: "status = 'declined'"}
  - name: pr
    table: pair
    grain: 1h
    coarser: [1d]
    dimensions:
      - name: parity
        expr: "a % 2"
    measures:
      - {name: n, fn: count}
      - {name: total, fn: sum, column: val}
      - {name: lo, fn: min, column: val}
      - {name: hi, fn: max, column: val}
      - {name: bs, fn: count_distinct, column: b}
"""

TABLES = """
CREATE TABLE acct (id int PRIMARY KEY, tier text, region text);
CREATE TABLE tx (id int PRIMARY KEY, acct_id int, amount numeric(10,2), status text,
                 ts timestamptz, note text);
ALTER TABLE tx ALTER COLUMN note SET STORAGE EXTERNAL;
CREATE TABLE pair (a int, b int, val int, ts timestamp, PRIMARY KEY (a, b));
"""

# Rows present before the snapshot.
SEED = """
INSERT INTO acct VALUES (1, 'gold', 'r1'), (2, 'silver', 'r2'), (3, NULL, 'r1');
INSERT INTO tx VALUES (1, 1, 10, 'ok', '2024-03-01 00:05+00', NULL),
                      (2, 2, 60, 'declined', '2024-03-01 00:20+00', 'short'),
                      (3, 1, 75.25, 'ok', '2024-03-01 01:05+00',
                       (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100) i)),
                      (4, 3, NULL, 'pending', '2024-03-01 00:05+00', NULL);
INSERT INTO pair VALUES (1, 1, 5, '2024-03-01 00:00'), (2, 1, 7, '2024-03-01 05:00');
"""

TX_COLUMNS = ["id", "acct_id", "amount", "status", "ts", "note"]
PAIR_COLUMNS = ["a", "b", "val", "ts"]
LOOKUP = "(SELECT tier FROM acct WHERE acct.id = tx.acct_id)"
BASE = "TIMESTAMPTZ '2024-03-01 00:00:00+00'"

ids = st.integers(1, 8)
acct_ids = st.integers(1, 4)
amounts = st.sampled_from(["1.50", "10", "49.99", "50", "75.25", "120", "0", "NULL"])
statuses = st.sampled_from(["'ok'", "'declined'", "'pending'", "NULL"])
minutes = st.integers(0, 60 * 30)
tiers = st.sampled_from(["'gold'", "'silver'", "NULL"])
notes = st.sampled_from(["NULL", "'short'", "BIG"])


def _note(kind: str, seed: int) -> str:
    if kind != "BIG":
        return kind
    # ~3 KB of incompressible text: stored out of line (TOAST).
    return f"(SELECT string_agg(md5(i::text || '{seed}'), '') FROM generate_series(1, 100) i)"


def _ts(minute: int) -> str:
    return f"{BASE} + interval '{minute} minutes'"


def _tx_insert(draw: st.DrawFn, i: int) -> str:
    acct = draw(st.one_of(acct_ids, st.just(99), st.none()))
    return (
        f"INSERT INTO tx VALUES ({i}, {acct if acct is not None else 'NULL'}, "
        f"{draw(amounts)}, {draw(statuses)}, {_ts(draw(minutes))}, "
        f"{_note(draw(notes), draw(st.integers(0, 9)))}) "
        f"ON CONFLICT DO NOTHING RETURNING id, {LOOKUP}"
    )


def _tx_update(draw: st.DrawFn, i: int) -> str:
    sets = draw(
        st.lists(st.sampled_from(["amount", "status", "ts", "acct_id"]), min_size=1, unique=True)
    )
    values = {
        "amount": draw(amounts),
        "status": draw(statuses),
        "ts": _ts(draw(minutes)),
        "acct_id": str(draw(acct_ids)),
    }
    assignments = ", ".join(f"{s} = {values[s]}" for s in sets)
    return f"UPDATE tx SET {assignments} WHERE id = {i} RETURNING id, {LOOKUP}"


def _tx_note(draw: st.DrawFn, i: int) -> str:
    note = _note(draw(notes), draw(st.integers(0, 9)))
    return f"UPDATE tx SET note = {note} WHERE id = {i} RETURNING id, {LOOKUP}"


def _tx_key(draw: st.DrawFn, i: int) -> str:
    j = draw(ids)
    return (
        f"UPDATE tx SET id = {j} WHERE id = {i} AND NOT EXISTS "
        f"(SELECT 1 FROM tx t2 WHERE t2.id = {j}) RETURNING id, {LOOKUP}"
    )


def _tx_delete(draw: st.DrawFn, i: int) -> str:
    return f"DELETE FROM tx WHERE id = {i} RETURNING id, NULL::text"


def _tx_bulk(draw: st.DrawFn, i: int) -> str:
    return (
        f"UPDATE tx SET amount = coalesce(amount, 0) + 1, ts = ts + interval '20 minutes' "
        f"WHERE status = {draw(statuses)} OR id < {i} RETURNING id, {LOOKUP}"
    )


def _tx_truncate(draw: st.DrawFn, i: int) -> str:
    return "TRUNCATE tx"


TX_STATEMENTS = {
    "insert": _tx_insert,
    "update": _tx_update,
    "note": _tx_note,
    "key": _tx_key,
    "delete": _tx_delete,
    "bulk": _tx_bulk,
    "truncate": _tx_truncate,
}


@st.composite
def tx_statement(draw: st.DrawFn) -> str:
    kinds = ["insert", "insert", "update", "update", "note", "key", "delete", "bulk", "truncate"]
    return TX_STATEMENTS[draw(st.sampled_from(kinds))](draw, draw(ids))


@st.composite
def acct_statement(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["insert", "insert", "tier", "tier", "key", "delete", "truncate"]))
    i = draw(acct_ids)
    if kind == "insert":
        return (
            f"INSERT INTO acct VALUES ({i}, {draw(tiers)}, 'r{draw(st.integers(0, 2))}') "
            f"ON CONFLICT (id) DO UPDATE SET tier = excluded.tier"
        )
    if kind == "tier":
        return f"UPDATE acct SET tier = {draw(tiers)} WHERE id = {i}"
    if kind == "key":
        j = draw(acct_ids)
        return (
            f"UPDATE acct SET id = {j} WHERE id = {i} AND NOT EXISTS "
            f"(SELECT 1 FROM acct a2 WHERE a2.id = {j})"
        )
    if kind == "delete":
        return f"DELETE FROM acct WHERE id = {i}"
    return "TRUNCATE acct"


@st.composite
def pair_statement(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["insert", "insert", "update", "key", "delete", "truncate"]))
    a, b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    val = draw(st.sampled_from(["1", "5", "-3", "100", "NULL"]))
    ts = f"TIMESTAMP '2024-03-01 00:00' + interval '{draw(minutes)} minutes'"
    if kind == "insert":
        return f"INSERT INTO pair VALUES ({a}, {b}, {val}, {ts}) ON CONFLICT DO NOTHING"
    if kind == "update":
        return f"UPDATE pair SET val = {val}, ts = {ts} WHERE a = {a} AND b = {b}"
    if kind == "key":
        c = draw(st.integers(1, 3))
        return (
            f"UPDATE pair SET b = {c} WHERE a = {a} AND b = {b} AND NOT EXISTS "
            f"(SELECT 1 FROM pair p2 WHERE p2.a = {a} AND p2.b = {c})"
        )
    if kind == "delete":
        return f"DELETE FROM pair WHERE a = {a} AND b = {b}"
    if draw(st.booleans()):
        return "TRUNCATE pair"
    return "TRUNCATE pair, tx"


@st.composite
def tier_change_then_tx(draw: st.DrawFn) -> list[str]:
    """An account's tier changes, then (same transaction) a transaction of it is written."""
    account = draw(acct_ids)
    return [
        f"UPDATE acct SET tier = {draw(tiers)} WHERE id = {account}",
        f"UPDATE tx SET acct_id = {account}, amount = {draw(amounts)} WHERE id = {draw(ids)} "
        f"RETURNING id, {LOOKUP}",
    ]


statement = st.one_of(tx_statement(), tx_statement(), acct_statement(), pair_statement())
statements = st.one_of(
    st.lists(statement, min_size=1, max_size=4),
    tier_change_then_tx(),
)


@dataclass
class Step:
    """A transaction of statements, then maybe a sync (and maybe an engine restart)."""

    statements: list[str]
    sync: bool = False
    restart: bool = False


steps = st.lists(
    st.builds(
        Step,
        statements,
        st.booleans(),
        st.sampled_from([False, False, False, True]),
    ),
    min_size=1,
    max_size=8,
)


@dataclass
class World:
    """The PostgreSQL side of one example, and the tiers recorded per tx row."""

    harness: Harness
    recorded: dict[int, str | None] = field(default_factory=dict)

    def run(self, step: Step) -> None:
        with self.harness.db.connect(autocommit=False) as conn:
            for sql in step.statements:
                cursor = conn.execute(sql.encode())
                if sql.startswith("TRUNCATE") and "tx" in sql.replace("TRUNCATE pair", ""):
                    self.recorded.clear()
                if "RETURNING" not in sql:
                    continue
                rows = cursor.fetchall()
                if sql.startswith("DELETE"):
                    for row in rows:
                        self.recorded.pop(int(row[0]), None)  # type: ignore[call-overload]
                    continue
                if " SET id = " in sql:
                    old = int(sql.split("WHERE id = ")[1].split(" ")[0])
                    if rows:
                        self.recorded.pop(old, None)
                for row in rows:
                    self.recorded[int(row[0])] = None if row[1] is None else str(row[1])  # type: ignore[call-overload]
            conn.commit()

    def lookup_source(self) -> str:
        return recorded_source(self.recorded)


_examples = itertools.count()


def _reset(db: PgDatabase) -> None:
    with db.connect() as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("DROP PUBLICATION IF EXISTS p")
        conn.execute("DROP TABLE IF EXISTS acct, tx, pair")
        conn.execute(TABLES.encode())


@pytest.fixture
def fresh(pg_db: PgDatabase, tmp_path: Path) -> tuple[PgDatabase, Path]:
    return pg_db, tmp_path


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.lists(statement, max_size=12),
    steps=steps,
    cuts=st.lists(st.booleans(), min_size=1, max_size=30),
    piece=st.sampled_from([PIECE_CHANGES, 1, 2, 5]),
    view_from=st.sampled_from([batch_changes.VIEW_CHANGES, 1]),
    index_mode=st.sampled_from(["false", "true", "auto"]),
)
def test_engine_equals_postgresql(
    fresh: tuple[PgDatabase, Path],
    *,
    initial: list[str],
    steps: list[Step],
    cuts: list[bool],
    piece: int,
    view_from: int,
    index_mode: str,
) -> None:
    """``piece``: batches with more changes come in pieces of this many (as a huge
    transaction does), applied in one store transaction. ``view_from``: a table's changes
    are a view over the Arrow table from this many (the large batches' way).
    ``index_mode``: ``store.mirror_key_index`` (the integer-keyed mirrors' rows found
    through an index, :mod:`headrace.engine.key_index`); ``auto`` from 0 rows, reviewed
    between every two syncs on the last batch alone, so the index comes and goes within
    the example."""
    yaml = YAML + f"store:\n  mirror_key_index: {index_mode}\n  mirror_key_index_rows: 0\n"
    with (
        patch.object(batch_changes, "VIEW_CHANGES", view_from),
        patch.object(key_index, "REVIEW_S", 0.0),
        patch.object(key_index, "REVIEW_BATCHES", 1),
        patch.object(key_index, "ROWS_PER_KEY", 1),  # small tables take the index too
    ):
        _engine_equals_postgresql(fresh, yaml, initial, steps, cuts=cuts, piece=piece)


def _engine_equals_postgresql(
    fresh: tuple[PgDatabase, Path],
    yaml: str,
    initial: list[str],
    steps: list[Step],
    *,
    cuts: list[bool],
    piece: int,
) -> None:
    db, tmp_path = fresh
    _reset(db)
    example = tmp_path / f"ex{next(_examples)}"
    example.mkdir()
    with db.connect() as conn:
        conn.execute(SEED.encode())
        recorded = {
            int(r[0]): None if r[1] is None else str(r[1])  # type: ignore[call-overload]
            for r in conn.execute(f"SELECT id, {LOOKUP} FROM tx").fetchall()
        }
    harness = make_harness(db, example, yaml)  # the snapshot copies the seed rows
    harness.batcher = Batcher(harness.slot.registry(), piece_changes=piece)
    world = World(harness, recorded)
    world.run(Step(initial))
    cut_points = itertools.cycle(cuts)
    try:
        for step in steps:
            world.run(step)
            if step.sync:
                harness.sync(lambda: next(cut_points))
                harness.engine.review_key_indexes()
                check_equal(harness, world)
            if step.restart:
                harness.sync(lambda: next(cut_points))
                harness.reopen()
                harness.batcher = Batcher(harness.slot.registry(), piece_changes=piece)
        harness.sync(lambda: next(cut_points))
        check(harness, world)
    finally:
        harness.close()


def check_equal(harness: Harness, world: World) -> None:
    """Mirrors and every rollup grain equal PostgreSQL now."""
    harness.assert_mirror("acct", ["id", "tier", "region"])
    harness.assert_mirror("tx", TX_COLUMNS)
    harness.assert_mirror("pair", PAIR_COLUMNS)
    harness.assert_rollup("txr", world.lookup_source(), {"tier": "recorded_tier"})
    harness.assert_rollup("pr")


def check(harness: Harness, world: World) -> None:
    check_equal(harness, world)
    # Incremental state == state rebuilt from the mirror, to the last bit.
    for name in ("txr", "pr"):
        views = [v for v in harness.config.rollup(name).grains]
        before = {
            g: normalized(harness.duck(f"SELECT * FROM rollup.{name}_{_label(g)}")) for g in views
        }
        harness.engine.rebuild(name)
        for grain in views:
            after = normalized(harness.duck(f"SELECT * FROM rollup.{name}_{_label(grain)}"))
            assert after == before[grain], f"{name} rebuilt differs from incremental"
    # Every change is in the history, once; counts per table agree.
    for table in ("tx", "pair"):
        history = harness.duck(
            f"SELECT count(*), count(DISTINCT (_hr_lsn, _hr_seq)) FROM history.{table} "
            "WHERE _hr_op <> 'S'"
        )[0]
        assert history[0] == history[1]
    # A delete carries its row's last values: those of the key's version before it.
    for table, key, columns in (("tx", ["id"], TX_COLUMNS), ("pair", ["a", "b"], PAIR_COLUMNS)):
        values = f"struct_pack({', '.join(columns)})"
        wrong = harness.duck(
            f"""SELECT * FROM (
                SELECT _hr_op, {values} AS v,
                       lag(_hr_op) OVER w AS prev_op, lag({values}) OVER w AS prev
                FROM history.{table}
                WINDOW w AS (PARTITION BY {", ".join(key)} ORDER BY _hr_lsn, _hr_seq)
            ) WHERE _hr_op = 'D'
                AND (prev_op IS NULL OR prev_op = 'D' OR v IS DISTINCT FROM prev)"""
        )
        assert not wrong, f"{table}: deletes without their row's last values: {wrong[:3]}"
    rows = {str(t): n for t, n in harness.duck("SELECT table_name, rows FROM headrace.tables")}
    for table in ("acct", "tx", "pair"):
        assert rows[f"public.{table}"] == harness.pg(f"SELECT count(*) FROM {table}")[0][0]


def _label(grain: timedelta) -> str:
    return grain_label(grain)
