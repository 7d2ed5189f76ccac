"""``headrace run --record DIR`` and ``headrace bench replay DIR``: a live run's batches,
recorded, applied again in-process on a copy of the store, give the same store."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import duckdb
import pytest
from rich.console import Console

from headrace.bench.replay import run as replay
from headrace.engine.engine import Engine
from headrace.errors import ConfigError
from headrace.run.recorder import STORE_FILE, BatchRecorder, load_recording, read_batch
from headrace.run.settings import RunSettings
from headrace.store.duckdb.store import DuckDBStore
from tests.conftest import PgDatabase
from tests.run.pipeline import make_pipeline, running, wait_caught_up

VIEWS = ["tx_volume_5m", "tx_volume_1h", "tx_merchant_1h", "tx_tier_1h"]


def test_recorded_batches_replay_to_the_same_rollups(
    pg_db: PgDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = make_pipeline(pg_db, tmp_path)
    recording = tmp_path / "recording"
    settings = RunSettings(status_interval_s=0.2, heartbeat_interval_s=0.5, record_dir=recording)
    with running(pipeline, settings) as (runner, _):
        wait_caught_up(runner, pipeline.write(rate=400, seconds=1.5))
    config, batches = load_recording(recording)
    assert config == pipeline.config
    assert len(batches) >= 2
    # The copy is the store before the first recorded batch; applying the recorded
    # batches to it gives the live store's mirrors, history and rollups.
    copy = tmp_path / "copy.duckdb"
    shutil.copyfile(recording / STORE_FILE, copy)
    store = DuckDBStore(copy)
    try:
        engine = Engine(config, store)
        for path in batches:
            engine.apply(read_batch(path))
    finally:
        store.close()
    queries = [
        "SELECT * FROM mirror.transactions ORDER BY id",
        "SELECT count(*), max(_hr_lsn) FROM history.transactions",
        *(f"SELECT * FROM rollup.{view} ORDER BY ALL" for view in VIEWS),
    ]
    live = duckdb.connect(pipeline.config.store.path, read_only=True)
    replayed = duckdb.connect(str(copy), read_only=True)
    try:
        for query in queries:
            assert live.execute(query).fetchall() == replayed.execute(query).fetchall(), query
    finally:
        live.close()
        replayed.close()

    result = replay(
        recording, repeat=1, top=5, skip=0, console=Console(file=io.StringIO(), width=200)
    )
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["batches"] == len(batches) == result.batches
    assert figures["apply_ms_p50"] > 0
    assert figures["statements_per_apply"] > 3
    assert 0 < figures["statement_ms_per_apply"] <= figures["apply_ms_mean"]
    assert len(figures["top"]) == 5
    # The CPU a change costs the applying process, beside the wall time.
    assert figures["apply_cpu_us_per_change"] > 0
    assert figures["maintain_cpu_us_per_change"] >= 0
    assert set(figures["min_max_mirror_reads"]) == {"tx_merchant"}  # the min/max rollup
    # Replaying did not touch the recording.
    _, again = load_recording(recording)
    assert again == batches


def test_recording_needs_an_empty_directory_and_a_whole_recording(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        BatchRecorder(tmp_path / "used")
    with pytest.raises(ConfigError, match="not a headrace recording"):
        load_recording(tmp_path / "used")


def test_a_recording_from_before_a_new_setting_reads_with_its_default(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=10)
    config = pipeline.config.model_copy(deep=True)
    # What unpickling a configuration recorded before the field existed gives.
    del config.store.__dict__["streaming_threads"]
    recording = tmp_path / "old"
    recording.mkdir()
    (recording / STORE_FILE).write_bytes(b"")
    (recording / "batch-000001.pkl").write_bytes(b"")
    with (recording / "pipeline.pkl").open("wb") as out:
        pickle.dump(config, out)
    loaded, _ = load_recording(recording)
    assert loaded.store.streaming_threads == 1
