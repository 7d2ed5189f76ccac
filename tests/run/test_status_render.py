"""`headrace status` in words: the store's checkpoints appear once there were some; the
writer's busy share is shown while running."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from headrace.run.metrics import FreshnessHistogram, RateWindow
from headrace.run.status import status_from_store
from headrace.run.status_render import render_status, summary_line
from headrace.store.duckdb.store import DuckDBStore


def _rendered(document: dict[str, object]) -> str:
    out = io.StringIO()
    render_status(document, Console(file=out, width=200))
    return out.getvalue()


def _running(**fields: object) -> dict[str, object]:
    """The status document of a run streaming now, with ``fields``."""
    return {
        "store": "/data/store.duckdb",
        "phase": "streaming",
        "running": True,
        "pid": 42,
    } | fields


def test_checkpoints_are_shown_while_running() -> None:
    document = _running(
        store_wal_bytes=3 * 2**20,
        store_checkpoints={"count": 2, "seconds": 1.5, "longest_s": 0.95, "wal_bytes": 1},
    )
    text = _rendered(document)
    assert "store: WAL 3.0 MB; 2 checkpoints, 1.5 s in all, longest 950 ms" in text
    document["store_checkpoints"] = {"count": 0, "seconds": 0, "longest_s": 0, "wal_bytes": 0}
    assert "checkpoints" not in _rendered(document)


def test_the_writers_busy_share_is_shown_while_running() -> None:
    document = _running(writer_busy=0.973)
    assert "writer busy 97%" in _rendered(document)
    assert "busy 97%" in summary_line(document)
    del document["writer_busy"]  # a status file of an older version, or the first second
    assert "writer busy -" in _rendered(document)


def test_the_busy_share_is_the_apply_time_over_the_window() -> None:
    """``writer_busy`` is the rate of the cumulative apply seconds: 1.5 s of applying
    in 2 s of window is 75% busy."""
    window = RateWindow(window_s=5.0)
    window.sample({"apply_seconds": 10.0}, FreshnessHistogram(), at=100.0)
    window.sample({"apply_seconds": 11.5}, FreshnessHistogram(), at=102.0)
    assert window.rate("apply_seconds") == 0.75


def test_dead_letters_are_counted_from_the_store_and_shown(tmp_path: Path) -> None:
    """Every run's dead letters (not this process's count): how many, and the newest."""
    store = DuckDBStore(tmp_path / "store.duckdb")
    try:
        assert status_from_store(store, "s")["dead_letters"] == {"count": 0, "newest": None}
        with store.transaction() as con:
            for lsn, reason in ((0x100, "first"), (0x200, "int -> text: cannot apply")):
                con.execute(
                    'INSERT INTO headrace.dead_letters (lsn, table_name, reason, payload, "at") '
                    "VALUES (?, 'public.transactions', ?, '{}', now())",
                    [lsn, reason],
                )
        document = status_from_store(store, "s")
    finally:
        store.close()
    dead = document["dead_letters"]
    assert dead["count"] == 2
    assert dead["newest"]["reason"] == "int -> text: cannot apply"
    assert dead["newest"]["lsn"] == "0/200"
    text = _rendered({**document, "store": "/data/store.duckdb"})
    assert "dead letters: 2" in text
    assert "public.transactions at 0/200: int -> text: cannot apply" in text


def test_a_large_transaction_being_applied_is_shown_with_its_progress() -> None:
    document = _running(
        applying={"changes": 1_000_000, "applied": 350_000, "pieces": 4, "seconds": 12.4}
    )
    expected = (
        "applying a large transaction: 350,000 of 1,000,000 changes (35%, 4 pieces) in 12 s, "
        "visible at its commit"
    )
    assert expected in _rendered(document)
    assert expected in summary_line(document)
    document["applying"] = None
    assert "applying" not in _rendered(document)
    assert "applying" not in summary_line(document)


def test_min_max_mirror_reads_are_shown_for_the_rollups_that_have_them() -> None:
    document = _running(
        rollups=[
            {
                "name": "tx_merchant",
                "state": "active",
                "reason": None,
                "min_max_mirror_reads": {"batches": 3, "groups_refilled": 1200},
            },
            {"name": "tx_volume", "state": "active", "reason": None},
        ]
    )
    text = _rendered(document)
    assert "min/max from the mirror" in text
    assert "3 batches, 1,200 groups refilled" in text
    document["rollups"] = [{"name": "tx_volume", "state": "active", "reason": None}]
    assert "min/max from the mirror" not in _rendered(document)


def test_lossy_values_are_shown_by_type_and_issue() -> None:
    document = _running(
        lossy_values=[
            {"type": "numeric", "issue": "NaN in a numeric(10,2)", "count": 3},
            {"type": "int4[]", "issue": "array flattened", "count": 1_200},
        ]
    )
    text = _rendered(document)
    assert "lossy values: 1,203" in text
    assert "numeric: NaN in a numeric(10,2) (3); int4[]: array flattened (1,200)" in text
    document["lossy_values"] = []
    assert "lossy" not in _rendered(document)


def test_a_mirror_with_a_key_index_says_so() -> None:
    row = {"name": "public.transactions", "rows": 5_000_000, "state": "active"}
    document = _running(tables=[row | {"key_indexed": True}, {**row, "name": "public.cards"}])
    text = _rendered(document)
    assert "public.transactions (key indexed)" in text
    assert "public.cards (key" not in text
