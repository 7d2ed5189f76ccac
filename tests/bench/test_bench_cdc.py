"""``headrace bench cdc`` end to end, small: every consumer drains the same stream.

On a throwaway cluster and on a named server (the test session's cluster standing in
for one elsewhere), where the run must leave the server's other slots alone.
"""

from __future__ import annotations

import io
import json

from rich.console import Console

from headrace.bench.cdc import run
from headrace.bench.server import DATABASE_PREFIX
from headrace.sandbox.postgres import ThrowawayPostgres
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot


def test_every_consumer_drains_the_stream_and_the_json_line_comes_last() -> None:
    out = io.StringIO()
    result = run(2_000, console=Console(file=out, width=200, highlight=False))
    lines = out.getvalue().strip().splitlines()
    assert json.loads(lines[-1])["decode_vs_noop"] == result.decode_vs_noop
    assert result.connection == "unix"
    assert result.pg_recvlogical_s > 0
    assert result.noop_s > 0
    assert result.decode_s > 0
    assert result.noop_walsender_cpu_s is not None  # a server on this machine


def test_against_a_named_server_other_slots_stay(
    pg_cluster: ThrowawayPostgres, pg_db: PgDatabase
) -> None:
    # Someone else's inactive slot, in another database of the same server.
    theirs = LogicalSlot(pg_db, slot="someone_elses").create()
    out = io.StringIO()
    result = run(
        2_000, server=pg_cluster.dsn(), console=Console(file=out, width=200, highlight=False)
    )
    assert result.connection == "server"
    assert result.decode_s > 0
    # The walsender is another machine's: not read from this one's /proc.
    assert result.noop_walsender_cpu_s is None
    assert result.decode_walsender_cpu_s is None
    slots = pg_db.fetchall(
        "SELECT database FROM pg_replication_slots WHERE slot_name = %s", (theirs.slot,)
    )
    assert slots == [(pg_db.name,)]
    # And nothing of the benchmark's own is left.
    leftovers = pg_db.fetchall(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{DATABASE_PREFIX}%",)
    )
    assert leftovers == []
