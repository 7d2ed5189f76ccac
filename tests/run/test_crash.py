"""kill -9 of ``headrace run`` at many points, with PostgreSQL changing meanwhile.

Each round starts ``headrace run`` and kills it: either at an exact point
through the test-only fault hooks (``HEADRACE_FAULT``, see
:mod:`headrace.run.faults`: mid-snapshot, after the snapshot's commit,
before/during a batch's store transaction, between the store's commit and
the slot's confirmation, after the confirmation), at a random visit of it,
or with SIGKILL after a random delay. The ten streaming rounds are drawn anew
every run (the seed is in every failure message). After every kill, the slot
must not be ahead of the store. After the last round a clean run drains the
slot; then every mirror and rollup equals PostgreSQL and history has no
duplicate change.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import duckdb
import psycopg
import pytest

from headrace.errors import parse_lsn
from tests.conftest import PgDatabase
from tests.run.pipeline import BackgroundWriter, Pipeline, RunProcess, make_pipeline

STREAMING_POINTS = ("before_apply", "during_apply", "after_commit", "after_confirm")
"""Fault points a streaming run passes once per store transaction."""


def draw_rounds(rng: random.Random, streaming_rounds: int = 10) -> list[str]:
    """The kills of one test: mid-snapshot, after the snapshot's commit, then
    ``streaming_rounds`` random ones: each a fault point (every one of
    :data:`STREAMING_POINTS` at least once) at a random visit (1 to 6), or a SIGKILL
    after a random delay (``kill``)."""
    choices = [*STREAMING_POINTS, "kill"]
    drawn = choices + [rng.choice(choices) for _ in range(streaming_rounds - len(choices))]
    rng.shuffle(drawn)
    return [
        "snapshot_chunk:1",
        "after_snapshot:1",
        *(point if point == "kill" else f"{point}:{rng.randint(1, 6)}" for point in drawn),
    ]


def store_and_slot(pipeline: Pipeline) -> tuple[int | None, int | None]:
    """The store's durable position and the slot's confirmed position (no process runs)."""
    duck = duckdb.connect(pipeline.config.store.path, read_only=True)
    try:
        row = duck.execute("SELECT lsn FROM headrace.position").fetchone()
    finally:
        duck.close()
    with psycopg.connect(pipeline.db.dsn, autocommit=True) as conn:
        slot = conn.execute(
            b"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's_run'"
        ).fetchone()
    return (
        int(row[0]) if row else None,
        parse_lsn(str(slot[0])) if slot and slot[0] is not None else None,
    )


@pytest.mark.slow
def test_kill_9_anywhere_then_drain_equals_postgres(pg_db: PgDatabase, tmp_path: Path) -> None:
    # A new draw of kill points every run; HEADRACE_CRASH_SEED=N replays run N.
    seed = int(os.environ.get("HEADRACE_CRASH_SEED", str(random.SystemRandom().randrange(10**6))))
    rng = random.Random(seed)  # noqa: S311 - chooses kill points, not a secret
    rounds = draw_rounds(rng)
    replay = f"(HEADRACE_CRASH_SEED={seed}: rounds {rounds})"
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=5_000)
    stored_positions: list[int] = []
    with BackgroundWriter(pipeline, rate=600) as writer:
        for fault in rounds:
            if fault == "kill":
                run = RunProcess(pipeline)
                time.sleep(rng.uniform(1.0, 4.0))
                code = run.kill()
            else:
                run = RunProcess(pipeline, fault)
                code = run.wait(120)
            assert code == -signal.SIGKILL, f"{fault}: exited with {code} {replay}\n{run.output()}"
            store, slot = store_and_slot(pipeline)
            if fault.startswith("snapshot_chunk"):
                assert store is None, f"a kill mid-snapshot must leave no position {replay}"
            if store is not None and slot is not None:
                # Never acknowledged to the server ahead of what the store holds.
                assert slot <= store, f"{fault}: slot {slot} ahead of the store {store} {replay}"
                stored_positions.append(store)
            elif fault != "snapshot_chunk:1":
                assert store is not None, f"{fault}: no position after the snapshot {replay}"
    end = writer.end_lsn
    assert stored_positions == sorted(stored_positions), f"position went backwards {replay}"
    assert len(set(stored_positions)) > 3, f"the rounds did not make progress {replay}"
    run = RunProcess(pipeline)
    run.wait_position(end, 120)
    assert run.terminate() == 0, run.output()
    pipeline.assert_equal_to_postgres()


def test_the_drawn_rounds_cover_every_point() -> None:
    for seed in range(50):
        rounds = draw_rounds(random.Random(seed))  # noqa: S311 - not a secret
        assert len(rounds) == 12
        assert rounds[:2] == ["snapshot_chunk:1", "after_snapshot:1"]
        points = {r.split(":")[0] for r in rounds[2:]}
        assert points == {*STREAMING_POINTS, "kill"}
