"""min/max under retraction equal PostgreSQL: the next extreme from the reserve or the mirror.

A batch that retracts a group's current minimum or maximum (an update of the
value, a row moving to another dimension value or bucket, a delete) flags the
group; its next extreme comes from the group's reserve (its values near the
extremes), or, when the reserve ran out, from the mirror rows of the flagged
groups only (prefiltered on plain dimension columns and the flagged buckets'
time range), which refills the reserve. These tests drive those paths with few
keys and few values, so that extremes are retracted in most batches, with NULL
dimension values, NULL times (the NULL bucket), DATE, TIMESTAMP and TIMESTAMPTZ
times and expression dimensions (no prefilter column), against the same GROUP
BY on PostgreSQL; with a reserve one value deep at each end, every group is
bounded, trimmed at each compaction and runs out often. After every sync each
reserve holds exactly the mirror's values beyond its group's bounds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.engine import reserve as reserve_module
from headrace.engine.extremes import FlaggedRange, time_prefilter
from headrace.engine.rollup import bucket_sql
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    ev:
      event_time: ts
rollups:
  - name: by_shop
    table: ev
    grain: 1h
    coarser: [1d]
    dimensions: [shop, region]
    measures:
      - {name: n, fn: count}
      - {name: lo, fn: min, column: amount}
      - {name: hi, fn: max, column: amount}
      - {name: lo_paid, fn: min, column: amount, where: "paid"}
  - name: by_parity
    table: ev
    grain: 1h
    dimensions:
      - name: parity
        expr: "amount % 2"
    measures:
      - {name: lo, fn: min, column: amount}
      - {name: hi, fn: max, column: amount}
  - name: by_day
    table: ev
    time: day
    grain: 1d
    dimensions: [shop]
    measures:
      - {name: n, fn: count}
      - {name: lo, fn: min, column: amount}
      - {name: hi, fn: max, column: amount}
  - name: by_local
    table: ev
    time: local_ts
    grain: 1h
    dimensions: [region]
    measures:
      - {name: lo, fn: min, column: amount}
      - {name: hi, fn: max, column: amount}
"""

TABLE = """
CREATE TABLE ev (id int PRIMARY KEY, shop text, region text, amount int, paid bool,
                 ts timestamptz, day date, local_ts timestamp);
"""

SEED = """
INSERT INTO ev VALUES
  (1, 'a', 'eu', 5, true, '2024-03-01 00:10+00', '2024-03-01', '2024-03-01 00:10'),
  (2, 'a', 'eu', 9, false, '2024-03-01 00:40+00', '2024-03-01', '2024-03-01 00:40'),
  (3, 'b', 'us', 1, true, '2024-03-01 01:10+00', '2024-03-02', '2024-03-01 01:10'),
  (4, NULL, 'us', 7, NULL, '2024-03-01 00:20+00', NULL, NULL);
"""

ROLLUPS = ("by_shop", "by_parity", "by_day", "by_local")

ids = st.integers(1, 6)
shops = st.sampled_from(["'a'", "'b'", "NULL"])
regions = st.sampled_from(["'eu'", "'us'", "NULL"])
amounts = st.sampled_from(["1", "2", "5", "7", "9", "NULL"])
paid = st.sampled_from(["true", "false", "NULL"])
times = st.sampled_from(
    [
        "'2024-03-01 00:10+00'",
        "'2024-03-01 00:50+00'",
        "'2024-03-01 01:10+00'",
        "'2024-03-02 03:00+00'",
        "NULL",
    ]
)
days = st.sampled_from(["'2024-03-01'", "'2024-03-02'", "NULL"])
local_times = st.sampled_from(
    ["'2024-03-01 00:10'", "'2024-03-01 01:59'", "'2024-03-01 02:00'", "NULL"]
)


@st.composite
def statement(draw: st.DrawFn) -> str:
    i = draw(ids)
    kind = draw(st.sampled_from(["insert", "insert", "update", "update", "move", "delete", "max"]))
    if kind == "insert":
        return (
            f"INSERT INTO ev VALUES ({i}, {draw(shops)}, {draw(regions)}, {draw(amounts)}, "
            f"{draw(paid)}, {draw(times)}, {draw(days)}, {draw(local_times)}) "
            "ON CONFLICT DO NOTHING"
        )
    if kind == "update":
        return f"UPDATE ev SET amount = {draw(amounts)}, paid = {draw(paid)} WHERE id = {i}"
    if kind == "move":
        column, values = draw(
            st.sampled_from(
                [
                    ("shop", shops),
                    ("region", regions),
                    ("ts", times),
                    ("day", days),
                    ("local_ts", local_times),
                ]
            )
        )
        return f"UPDATE ev SET {column} = {draw(values)} WHERE id = {i}"
    if kind == "delete":
        return f"DELETE FROM ev WHERE id = {i}"
    # Every row holding its shop's maximum moves down: the maximum of many groups at once.
    return (
        "UPDATE ev SET amount = amount - 3 WHERE amount = "
        "(SELECT max(amount) FROM ev e2 WHERE e2.shop IS NOT DISTINCT FROM ev.shop)"
    )


def _reset(db: PgDatabase) -> None:
    with db.connect() as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("DROP PUBLICATION IF EXISTS p")
        conn.execute("DROP TABLE IF EXISTS ev")
        conn.execute(TABLE.encode())
        conn.execute(SEED.encode())


def _assert_equal(h: Harness) -> None:
    h.assert_mirror("ev", ["id", "shop", "region", "amount", "paid", "ts", "day", "local_ts"])
    for name in ROLLUPS:
        h.assert_rollup(name)
    h.assert_reserves(*ROLLUPS)


DEPTHS = {"shallow": (1, 2, 1), "thin": (2, 3, 2)}
"""Reserve settings (KEEP, TRIM_AT, THIN_AT) making every path common with few rows:
one value at each end, trimmed beyond two, refilled between batches only when a side
is empty (so batches find sides empty); or two at each end, refilled when a side
has fewer than two (so the refill between batches runs often)."""


def _set_depth(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    keep, trim_at, thin_at = DEPTHS[name]
    monkeypatch.setattr(reserve_module, "KEEP", keep)
    monkeypatch.setattr(reserve_module, "TRIM_AT", trim_at)
    monkeypatch.setattr(reserve_module, "THIN_AT", thin_at)


@pytest.fixture(params=["default", *DEPTHS])
def depth(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The reserves' depth: the default, or one of :data:`DEPTHS`."""
    if request.param in DEPTHS:
        _set_depth(monkeypatch, request.param)
    return str(request.param)


def _sync(h: Harness, cut: Callable[[], bool] | None = None) -> None:
    """Apply what PostgreSQL committed, then compact (which trims the reserves)."""
    h.sync(cut)
    h.engine.compact_rollups(force=True)


_examples = itertools.count()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    transactions=st.lists(st.lists(statement(), min_size=1, max_size=5), min_size=1, max_size=6),
    cuts=st.lists(st.booleans(), min_size=1, max_size=10),
)
def test_extremes_equal_postgresql(
    pg_db: PgDatabase, tmp_path: Path, depth: str, transactions: list[list[str]], cuts: list[bool]
) -> None:
    _reset(pg_db)
    example = tmp_path / f"ex{next(_examples)}"
    example.mkdir()
    h = make_harness(pg_db, example, YAML)
    cut_points = itertools.cycle(cuts)
    try:
        for number, statements in enumerate(transactions):
            h.transaction(*statements)
            if number % 2:
                _sync(h, lambda: next(cut_points))
                _assert_equal(h)
        _sync(h, lambda: next(cut_points))
        _assert_equal(h)
    finally:
        h.close()


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    _reset(pg_db)
    harness = make_harness(pg_db, tmp_path, YAML)
    yield harness
    harness.close()


def test_retracted_extremes_recomputed(h: Harness, depth: str) -> None:
    """Each way of retracting an extreme, one batch each, and several in one batch."""
    steps = [
        # The minimum of (a, eu, 00h) moves to another bucket: 9 remains.
        ["UPDATE ev SET ts = '2024-03-01 02:10+00' WHERE id = 1"],
        # The maximum of shop b leaves to the NULL shop, and a row arrives with a NULL day.
        [
            "UPDATE ev SET shop = NULL WHERE id = 3",
            "INSERT INTO ev VALUES (5, 'b', 'us', 3, true, '2024-03-01 01:30+00', NULL, "
            "'2024-03-01 01:30')",
        ],
        # The NULL shop's extremes retracted by a delete and an update, a NULL time arrives.
        [
            "DELETE FROM ev WHERE id = 4",
            "UPDATE ev SET amount = 0 WHERE id = 3",
            "INSERT INTO ev VALUES (6, NULL, NULL, 8, false, NULL, '2024-03-02', NULL)",
        ],
        # The only row of a group retracted (the group disappears), its value re-added elsewhere.
        ["UPDATE ev SET region = 'us', day = NULL WHERE id = 2"],
        # Extremes retracted in the NULL bucket and the NULL day.
        ["UPDATE ev SET amount = 1 WHERE id = 6", "UPDATE ev SET amount = 4 WHERE id = 5"],
        ["DELETE FROM ev WHERE id IN (1, 2, 3, 5, 6)"],
    ]
    _assert_equal(h)
    for statements in steps:
        h.transaction(*statements)
        _sync(h)
        _assert_equal(h)


def test_exhausted_reserve_refilled_from_the_mirror(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bounded group whose minimum side runs out takes its minimum from the mirror, and
    its reserve is refilled from it (new bounds) in the same batch."""
    _set_depth(monkeypatch, "shallow")
    h.transaction(
        "INSERT INTO ev SELECT 100 + g, 'z', 'eu', g, true, '2024-03-01 05:10+00', "
        "'2024-03-01', '2024-03-01 05:10' FROM generate_series(1, 6) g"
    )
    _sync(h)  # trimmed: the group keeps 1 and 6 only
    plan = h.engine.registry.rollups["by_shop"].plan
    assert plan is not None
    reserve = plan.reserves[0]
    group = f"FROM {plan.state} WHERE _hr_d0 = 'z'"
    assert h.duck(f"SELECT {reserve.lo}, {reserve.hi} {group}") == [(1, 6)]
    before = h.engine.mirror_reads()["by_shop"].batches
    h.transaction("DELETE FROM ev WHERE id = 101")  # the minimum, the low side's only value
    h.sync()
    _assert_equal(h)
    assert h.duck(f"SELECT {reserve.lo}, {reserve.hi}, _hr_m1_v {group}") == [(2, 6, 2)]
    values = f"SELECT _hr_value FROM {reserve.table} WHERE _hr_d0 = 'z' ORDER BY 1"
    assert h.duck(values) == [(2,), (6,)]
    assert h.engine.mirror_reads()["by_shop"].batches == before + 1  # shown by `status`


def test_thin_reserve_refilled_between_batches(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A side worn below THIN_AT is rebuilt from the mirror after the compaction cycle,
    and counted for `headrace status`."""
    _set_depth(monkeypatch, "thin")
    h.transaction(
        "INSERT INTO ev SELECT 100 + g, 'z', 'eu', g, true, '2024-03-01 05:10+00', "
        "'2024-03-01', '2024-03-01 05:10' FROM generate_series(1, 6) g"
    )
    _sync(h)  # trimmed: the group keeps 1, 2 and 5, 6
    plan = h.engine.registry.rollups["by_shop"].plan
    assert plan is not None
    reserve = plan.reserves[0]
    values = f"SELECT _hr_value FROM {reserve.table} WHERE _hr_d0 = 'z' ORDER BY 1"
    assert h.duck(values) == [(1,), (2,), (5,), (6,)]
    reads = h.engine.mirror_reads()["by_shop"]
    h.transaction("DELETE FROM ev WHERE id = 101")  # the low side keeps one value: thin
    h.sync()
    assert h.engine.mirror_reads()["by_shop"] == reads  # the reserve had the next minimum
    h.engine.compact_rollups(force=True)
    _assert_equal(h)
    assert h.duck(values) == [(2,), (3,), (5,), (6,)]
    refilled = h.engine.mirror_reads()["by_shop"].groups_refilled
    assert refilled > reads.groups_refilled
    assert set(h.engine.mirror_reads()) == set(ROLLUPS)  # every rollup here has min/max


BOUNDARY_ROWS = """
INSERT INTO ev VALUES
  (11, 'a', 'eu', 3, true, '2024-03-01 00:59:59.999999+00', '2024-02-29', '2024-03-01 00:59:59'),
  (12, 'a', 'eu', 4, true, '2024-03-01 01:00+00', '2024-03-01', '2024-03-01 01:00'),
  (13, 'a', 'eu', 6, true, '2024-03-01 02:59:59.999999+00', '2024-03-02', '2024-03-01 02:59:59'),
  (14, 'a', 'eu', 8, true, '2024-03-01 03:00+00', '2024-03-03', '2024-03-01 03:00'),
  (15, 'a', 'eu', 2, true, NULL, NULL, NULL);
"""


@pytest.mark.parametrize(
    ("first", "last", "nulls"),
    [
        (datetime(2024, 3, 1, 1, tzinfo=UTC), datetime(2024, 3, 1, 2, tzinfo=UTC), False),
        (datetime(2024, 3, 1, 1, tzinfo=UTC), datetime(2024, 3, 1, 1, tzinfo=UTC), True),
        (None, None, True),
    ],
)
def test_recompute_prefilter_keeps_the_flagged_buckets(
    h: Harness, first: datetime | None, last: datetime | None, nulls: bool
) -> None:
    """The recompute reads only mirror rows passing a filter on the raw time column: it
    keeps every row of the flagged buckets (exactly those for timestamps; whole days, a
    superset, for dates), at the buckets' edges too."""
    h.transaction(BOUNDARY_ROWS)
    h.sync()
    cursor = h.store.cursor()
    try:
        for name in ("by_shop", "by_day", "by_local"):
            plan = h.engine.registry.rollups[name].plan
            assert plan is not None
            lo, hi = first, last
            if name == "by_day" and lo is not None and hi is not None:  # day buckets
                lo, hi = lo.replace(hour=0), hi.replace(hour=0)
            flagged = FlaggedRange(lo, hi, nulls)
            sql, params = time_prefilter(plan, flagged)
            bucket = bucket_sql(plan.epoch_us, plan.config.grain)
            rows = cursor.execute(
                f"SELECT id, {bucket}, {sql} FROM {plan.table.mirror} m", params
            ).fetchall()
            wanted = {
                i
                for i, b, _ in rows
                if (b is None and nulls) or (b is not None and lo and hi and lo <= b <= hi)
            }
            kept = {i for i, _, passes in rows if passes}
            assert wanted <= kept, name
            if plan.time_type != "DATE":
                assert kept == wanted, name
            elif lo is not None:  # whole days from the first one to the end's day
                assert not kept & {11, 14}, name
                assert {1, 12} <= kept, name
    finally:
        cursor.close()
