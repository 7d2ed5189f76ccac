"""From the pipeline file to the source's settings: DSN, tables, slot, publication."""

from __future__ import annotations

from pathlib import Path

from headrace.errors import ConfigError
from headrace.pipeline.model import PipelineConfig
from headrace.run.settings import RunSettings
from headrace.source.postgres.snapshot import SnapshotSettings
from headrace.source.postgres.source_settings import SourceSettings


def source_dsn(config: PipelineConfig) -> str:
    """The source DSN, or a :class:`ConfigError` saying where it should come from."""
    dsn = config.source.resolved_dsn()
    if dsn:
        return dsn
    if config.source.dsn_env is not None:
        raise ConfigError(
            f"the environment variable {config.source.dsn_env} (source.dsn_env) is not set",
            f"export {config.source.dsn_env}=postgresql://user@host/db, or set source.dsn",
        )
    raise ConfigError(
        "the pipeline file names no source database",
        "set source.dsn (a libpq URI) or source.dsn_env (a variable holding it)",
    )


def source_settings(config: PipelineConfig, run: RunSettings) -> SourceSettings:
    """Settings of the streaming :class:`PostgresSource` for this pipeline."""
    return SourceSettings(
        dsn=source_dsn(config),
        tables=tuple(config.table_refs),
        publication=config.source.publication,
        slot=config.source.slot,
        batch_max_changes=run.batch_max_changes,
        piece_max_changes=run.piece_max_changes,
        spill_dir=Path(config.store.path).parent,
        batch_max_wait_s=run.batch_max_wait_s,
        heartbeat_interval_s=run.heartbeat_interval_s,
        application_name="headrace",
    )


def snapshot_settings(
    config: PipelineConfig, run: RunSettings, *, replace_slot: bool
) -> SnapshotSettings:
    """Settings of the initial snapshot: same slot, same publication (its column lists
    and row filters apply to the copy too), every configured table."""
    return SnapshotSettings(
        dsn=source_dsn(config),
        tables=tuple(config.table_refs),
        slot=config.source.slot,
        publication=config.source.publication,
        workers=run.snapshot_workers,
        if_slot_exists="replace" if replace_slot else "error",
    )
