"""The throwaway cluster: starts with logical replication, restarts, and leaves nothing behind."""

from __future__ import annotations

import psycopg

from headrace.sandbox.postgres import ThrowawayPostgres, find_bindir


def test_bindir_has_the_server_tools() -> None:
    bindir = find_bindir()
    assert (bindir / "initdb").exists()
    assert (bindir / "pg_ctl").exists()


def test_cluster_is_logical_restarts_and_is_removed() -> None:
    cluster = ThrowawayPostgres(settings={"max_connections": "50"})
    cluster.start()
    root = cluster.root
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
            assert conn.execute("SHOW max_connections").fetchone() == ("50",)
            conn.execute("CREATE TABLE kept (id int)")
            conn.execute("INSERT INTO kept VALUES (1)")
        cluster.restart(mode="immediate")
        with psycopg.connect(cluster.dsn(unix=True)) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    finally:
        cluster.stop()
    assert not root.exists()
