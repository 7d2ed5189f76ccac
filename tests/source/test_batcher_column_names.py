"""Change-metadata columns never clash with the table's own column names."""

from __future__ import annotations

from headrace.source.changes import OLD_KIND, OldKind, old_name
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot


def test_a_column_named_kind_keeps_the_old_kind_marker(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int PRIMARY KEY, kind text)")
    pg_db.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    slot = LogicalSlot(pg_db).create("TABLE t")
    pg_db.execute("INSERT INTO t VALUES (1, 'a')")
    pg_db.execute("UPDATE t SET kind = 'b' WHERE id = 1")
    batch = slot.batch()
    assert batch is not None
    data = batch.tables[0].data
    assert data.column(OLD_KIND).to_pylist() == [None, OldKind.ROW.value]
    assert data.column(old_name("kind")).to_pylist() == [None, "a"]
    assert data.column("kind").to_pylist() == ["a", "b"]
